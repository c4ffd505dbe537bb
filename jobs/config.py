"""Config loading shared by every job: one typed config tree per job, from its sources in order.

Contract: `load_config(Cls, path, overrides, base, sets)` returns a `Cls` built from, lowest
first, the defaults or a preset (`base`), the YAML file at `path`, the flags (`overrides`: dotted
key -> value, None = not given) and each `--set section.key=value` (`sets`, repeatable, reaching
every key). The merged whole is checked once by the one walker (pipelines.settings.decode): an
unknown key, a value of the wrong type or out of its rule is one error naming the source (the
file, the flag, the `--set`), the key, the value and what it must be, so a flag and the same YAML
key are refused or accepted alike. A string value `~` or `~/...` is the home directory.
`user_errors` gives every command the same one-line errors and exit statuses. `--print-config`
(`print_config_option`) shows the resolved config as YAML that `--config` accepts, and runs
nothing. `as_run_location` and `as_model_location` take a local path or an object-store URI
(pipelines/storage.py), refusing on the driver, before anything is written, a URI that can't work
(unknown scheme, no bucket, no such model), naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import click
import yaml

from pipelines import MissingPath, UserError

T = TypeVar("T")
DEFAULTS = "defaults"


class Layers:
    """The sources of one config, lowest first (defaults < preset < file < flags < --set), each
    key remembered with the source that set it last, so an error names where the value came from."""

    def __init__(self, base: Any, source: str = DEFAULTS):
        self.data: dict = dataclasses.asdict(base)
        self.origin: dict[str, str] = {}
        self.base_source = source

    def add(self, source: str, values: Mapping[str, Any], dotted: bool = True) -> "Layers":
        """Merge `values` over what is there: a file's nested mapping (`dotted=False`: a key
        "train.lr" is a key of its own, refused as unknown), or dotted keys (`{"train.lr": 0.1}`)."""
        tree = nested(values) if dotted else dict(values)
        self.data = merged(self.data, tree)
        for key in _leaves(tree):
            self._set_origin(key, source)
        return self

    def put(self, source: str, key: str, value: Any) -> "Layers":
        """Set dotted `key` to `value` whole (a flag: its mapping replaces the field's, never merges)."""
        *parents, leaf = key.split(".")
        target = self.data
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}  # a section the defaults lack: the walker names the unknown key
            target = target[part]
        target[leaf] = value
        for k in [k for k in self.origin if k.startswith(key + ".")]:
            del self.origin[k]
        self._set_origin(key, source)
        return self

    def _set_origin(self, key: str, source: str) -> None:
        self.origin.pop(key, None)  # re-inserted: the newest setting is last
        self.origin[key] = source

    def source_of(self, key: str) -> str:
        """The source of `key` (or of the value that holds it, or of its last-set part)."""
        parts = re.split(r"\.|(?=\[)", key)
        for n in range(len(parts), 0, -1):
            k = ".".join(parts[:n]).replace(".[", "[")
            if k in self.origin:
                return self.origin[k]
            if n == len(parts):
                inside = [s for o, s in self.origin.items() if o.startswith(k + ".")]
                if inside:
                    return inside[-1]
        return self.base_source

    def build(self, cls: type[T]) -> T:
        from pipelines.settings import decode

        return decode(cls, self.data, self.source_of)


def nested(values: Mapping[str, Any]) -> dict:
    """`{"train.lr": 0.1, "seed": 1}` as `{"train": {"lr": 0.1}, "seed": 1}` (a YAML file's shape)."""
    tree: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        target = tree
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return tree


def _leaves(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [prefix + k]
    return out


def merged(base: dict, update: Mapping) -> dict:
    """`update` over `base`, mapping by mapping (a list or a value replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


def flag_name(key: str, flags: Optional[Mapping[str, str]] = None) -> str:
    """The command-line flag that sets config `key`: `flags[key]`, else `--<leaf-with-dashes>`."""
    return (flags or {}).get(key) or "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def parse_sets(sets: typing.Iterable[str]) -> list[tuple[str, dict]]:
    """`--set section.key=value` (repeatable) as layers; the value is read as YAML (`1e-4`, `[0.9, 0.98]`,
    `null`), then as the field's type."""
    layers = []
    for text in sets or ():
        key, eq, value = text.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
            raise UserError(f"--set {text!r}: write --set section.key=value (e.g. --set train.lr=1e-4)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        layers.append((f"--set {text}", {key.strip(): parsed}))
    return layers


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[T] = None, sets: typing.Iterable[str] = (), flags: Optional[Mapping[str, str]] = None,
                base_source: str = DEFAULTS) -> T:
    """`base` (or `cls()`), then the YAML file at `path`, then `overrides` (flags: dotted key ->
    value; None = not given), then each `--set`, checked as a whole by the one walker
    (pipelines.settings.decode), any error naming the source of the key."""
    layers = Layers(base if base is not None else cls(), base_source)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MissingPath(f"config file {p} does not exist")
        layers.add(str(p), read_yaml(read_text(p, "config file"), str(p)), dotted=False)
    for key, value in (overrides or {}).items():
        if value is not None:
            layers.put(flag_name(key, flags), key, value)
    for source, values in parse_sets(sets):
        layers.add(source, values)
    return layers.build(cls)


def read_text(path: str | Path, what: str) -> str:
    """A text file the user named (a config), as UTF-8; anything else is one error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e}); save it as UTF-8") from None


def read_yaml(text: str, where: str) -> dict:
    """A YAML document that must be a mapping (empty: {}); a parse error is one line naming
    `where` and what the parser expected."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def dump_config(cfg: Any) -> str:
    """The config as YAML that `--config` reads back into the same config."""
    plain = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # tuples, Paths -> YAML-safe
    return yaml.safe_dump(plain, sort_keys=False)


def config_flags(presets: dict):
    """`--config FILE` and `--preset NAME` for a training command (it receives `config_path` and
    `preset`): where its config comes from, read by `chosen_preset` and `load_config`."""
    def add(command):
        command = click.option("--preset", type=click.Choice(sorted(presets)),
                               help="Model size and the training settings that suit it (see --print-config).")(command)
        command = set_option(command)
        return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                            help="YAML config (defaults < preset < this file < flags < --set).")(command)
    return add


def set_option(command):
    """`--set section.key=value` (repeatable) for a job's click command: it receives `sets`, a tuple
    of those strings for `load_config`; any key of the config, over the file and the flags."""
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="Any config key, e.g. --set train.warmup_steps=50 (repeatable; over --config and "
                             "the flags; see --print-config for the keys).")(command)


def print_config_option(command):
    """`--print-config` for a job's click command: it receives `print_config: bool` and, when set,
    calls `echo_config(cfg)` instead of running."""
    return click.option("--print-config", "print_config", is_flag=True,
                        help="Print the resolved config (preset, then --config, flags and --set) as YAML and exit.")(command)


@contextlib.contextmanager
def stdout_for_the_result():
    """Send what a job prints to stdout (its own progress lines, libraries' prints, Ray's forwarded
    worker output) to stderr, so `raybert score|pretrain|finetune ... | jq` reads the JSON result alone."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def verbosity_options(command):
    """`--quiet` and `--verbose` for a job's click command (pipelines.console says what each shows),
    set for this process and the Ray it starts before the command runs."""
    import functools

    @functools.wraps(command)
    def run(*args, quiet: bool, verbose: bool, **kwargs):
        from pipelines.console import NORMAL, QUIET, VERBOSE, set_verbosity

        if quiet and verbose:
            raise click.UsageError("--quiet and --verbose: choose one")
        set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)
        return command(*args, **kwargs)

    run = click.option("--verbose", "-v", is_flag=True,
                       help="Everything Ray, Ray Data, Ray Train and DeepSpeed log (INFO lines, operator progress).")(run)
    return click.option("--quiet", "-q", is_flag=True,
                        help="Errors and the result only: no progress or summary line.")(run)


def from_preset(presets: dict, name: str):
    """A fresh config of the named preset; an unknown name is refused, listing the presets."""
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]()


def chosen_preset(flag: Optional[str], config_path: Optional[str | Path], sets: typing.Iterable[str] = ()) -> Optional[str]:
    """The whole-run preset a training command runs with: the last `--set model.preset=X`, else
    `--preset`, else the config file's `model.preset`. Wherever it is named, it chooses both the
    model and the training defaults, and the order is defaults < preset < file < flags < --set
    (as HfArgumentParser and Ray users expect)."""
    named = [values["model.preset"] for _, values in parse_sets(sets) if "model.preset" in values]
    if named:
        return str(named[-1])
    if flag:
        return flag
    if config_path is None or not Path(config_path).is_file():
        return None  # no file, or load_config reports the missing one
    model = read_yaml(read_text(config_path, "config file"), str(config_path)).get("model")
    return model.get("preset") if isinstance(model, Mapping) else None


def user_errors(*more: type):
    """Decorator for a click command: an error the user can act on (`pipelines.UserError`: a bad
    setting, file or path, plus the command's own `more`) is one `Error:` line and exit status 1,
    never a traceback; any other exception (a library's, an internal bug) keeps its traceback. A
    target held by another run (`jobs.schedule.RunLocked`) is exit status 75 (EX_TEMPFAIL: skipped,
    try later)."""
    import functools

    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            from jobs.schedule import EXIT_LOCKED, RunLocked

            try:
                return command(*args, **kwargs)
            except RunLocked as e:
                err = click.ClickException(str(e))
                err.exit_code = EXIT_LOCKED
                raise err from e
            except (UserError, *more) as e:
                raise click.ClickException(str(e)) from e
        return run
    return wrap


def echo_config(cfg: Any) -> None:
    click.echo(dump_config(cfg), nl=False)


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def as_model_location(what: str, value: Optional[str]) -> Optional[str]:
    """A model or tokenizer setting: a local path (`file://` stripped), or an object-store URI that
    exists, checked here on the driver; every process that loads it takes a node-local copy
    (pipelines.storage.cached_copy)."""
    from pipelines import storage

    if not value or not _URI.match(str(value)):
        return value
    if not storage.is_uri(value):
        return str(value)[len("file://"):]
    import pyarrow.fs as pafs

    try:
        kind = storage.probe(value)
    except ValueError as e:  # unreachable store or a scheme pyarrow can't open
        raise UserError(f"{what} {e}") from None
    if kind == pafs.FileType.NotFound:
        raise MissingPath(f"{what} {value} does not exist")
    return str(value).rstrip("/")


def as_run_location(value: str) -> str:
    """A run dir as the jobs use it: a local path made absolute (`file://` stripped), or an
    object-store URI that pyarrow can open and whose bucket exists, checked here on the driver so
    a typo fails in seconds, not after Ray Train has started."""
    import pyarrow.fs as pafs

    from pipelines import storage

    loc = storage.normalize(value)
    if not storage.is_uri(loc):
        return loc
    try:
        fs, path = pafs.FileSystem.from_uri(loc)
    except (ValueError, OSError) as e:
        raise UserError(f"run_dir {value}: not a storage URI pyarrow can open ({e}); use a local path or "
                         f"s3://bucket/path, gs://bucket/path") from None
    bucket = path.split("/", 1)[0]
    if "/" not in path.strip("/"):
        raise UserError(f"run_dir {value}: give a directory inside the bucket (s3://{bucket}/my-run), not the bucket itself")
    kind = storage.probe(loc, query=lambda: fs.get_file_info(bucket).type)
    if kind == pafs.FileType.NotFound:
        raise UserError(f"run_dir {value}: bucket {bucket!r} does not exist (or these credentials can't see it); "
                         f"create it first")
    return loc


def load_deepspeed(value: Any) -> Optional[dict]:
    """`train.deepspeed` as a dict: a mapping (from YAML) as is, a string as the path of a DeepSpeed
    JSON file (`--deepspeed FILE`), read here on the driver so the workers get its content."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    path = Path(str(value))
    if not path.is_file():
        raise MissingPath(f"deepspeed config {path} does not exist (pass a DeepSpeed JSON file)")
    try:
        data = json.loads(read_text(path, "deepspeed config"))
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"deepspeed config {path}: expected a JSON object, got {type(data).__name__}")
    return data
