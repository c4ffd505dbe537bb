"""Config loading shared by every job: a typed dataclass, filled from a YAML file, then a few
CLI overrides on top.

Contract: `load_config(Cls, path, overrides)` returns a `Cls` instance. YAML keys must be field
names of `Cls` (nested dataclasses are nested mappings); an unknown key is an error that names the
key and the file, so a typo never silently falls back to a default; a value of the wrong type, or
out of its range (jobs/checks.py), is an error naming the key, the value and what it must be.
A string value `~` or `~/...` is the home directory (`home_expanded`), as a shell would make it
of a flag. Overrides whose value is None (a CLI flag that was not given) are ignored; each job's `validate`
checks the ranges of the final config, flags included. `user_errors` gives every command the same one-line
errors and exit statuses. `--print-config` (`print_config_option`) shows the
resolved config as YAML that `--config` accepts, and runs nothing. `as_run_location` and
`as_model_location` take a local path or an object-store URI (pipelines/storage.py), refusing on
the driver, before anything is written, a URI that can't work (unknown scheme, no bucket, no such
model), naming it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import click
import yaml

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly nested) mapping, rejecting unknown keys and values
    out of their range (jobs.checks: the error names `where`, the dotted key from `prefix`, the
    value and the range, before a dataclass's own checks can say less). Values are taken as they
    are: a user's mapping goes through `read_mapping` first."""
    from jobs.checks import check_fields

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
                         f"known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_mapping(hint, value, where, f"{prefix}{name}.")
        kwargs[name] = value
    check_fields(cls, kwargs, prefix, where)
    return cls(**kwargs)


_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _type_name(hint) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(typing.get_origin(hint) or hint, str(hint))


def typed_value(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML) as the type the field's `hint` wants, or a ValueError naming the key,
    the value and the type. A quoted boolean or number ("false", "4096") and a YAML 1.1 float that
    PyYAML reads as a string ("1e-4") are read as the field's type; anything else of the wrong type
    is refused, never silently reinterpreted ("false" is not true). A single string is accepted
    where a list is wanted (one path)."""
    if typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:
            return typed_value(value, options[0], where)
        for option in options:  # Union[str, list]: a value of one of them, as it is
            if isinstance(value, typing.get_origin(option) or option):
                return value
        raise ValueError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    text = value.strip() if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[text.lower()]
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and re.fullmatch(r"[+-]?[0-9][0-9_]*", text):
            return int(text)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int is a number too (and prints back as written)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        item = (typing.get_args(hint) or (Any,))[0]
        if isinstance(value, list) and (item is Any or all(isinstance(v, item) for v in value)):
            return value
    elif hint is dict:
        if isinstance(value, Mapping):
            return value
    else:
        return value
    raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def to_mapping(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(obj: T, overrides: Mapping[str, Any]) -> T:
    """Set dotted fields (`"train.max_steps": 10`) on a copy of `obj`; None values are skipped."""
    obj = copy.deepcopy(obj)
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = obj
        *parents, leaf = dotted.split(".")
        for p in parents:
            target = getattr(target, p)
        if leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ValueError(f"override {dotted!r}: {type(target).__name__} has no field {leaf!r}")
        setattr(target, leaf, value)
    return obj


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[T] = None) -> T:
    """`base` (or `cls()`), updated by the YAML file at `path`, then by `overrides`."""
    cfg = base if base is not None else cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = read_yaml(p.read_text(), str(p))
        merged = _merge(to_mapping(cfg), read_mapping(cls, data, str(p)))
        cfg = from_mapping(cls, merged, str(p))
    return apply_overrides(cfg, overrides or {})


def read_yaml(text: str, where: str) -> dict:
    """A YAML document that must be a mapping (empty: {}); a parse error is one line naming
    `where` and what the parser expected."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def read_mapping(cls, data: Mapping, where: str, prefix: str = "") -> dict:
    """A user's mapping for dataclass `cls` (a config file's own keys, before the defaults they
    update fill in the rest), checked (unknown keys, wrong types) and read as its fields' types."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'the file'}: expected a mapping of {cls.__name__} keys "
                         f"({', '.join(f.name for f in dataclasses.fields(cls))}), got {data!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
                         f"known keys: {sorted(hints)}")
    out = {}
    for name, value in data.items():
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            out[name] = read_mapping(hint, value, where, key + ".")
        else:
            out[name] = home_expanded(typed_value(value, hint, f"{where}: {key}"))
    return out


def home_expanded(value: Any) -> Any:
    """`~/...` in a config file's path settings is the home directory, as a shell makes it of a
    flag: left as it is, `output: ~/emb` wrote to a directory named `~` under the working dir."""
    import os

    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [home_expanded(v) for v in value]
    return value


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


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
        return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                            help="YAML config (defaults < preset < this file < flags).")(command)
    return add


def print_config_option(command):
    """`--print-config` for a job's click command: it receives `print_config: bool` and, when set,
    calls `echo_config(cfg)` instead of running."""
    return click.option("--print-config", "print_config", is_flag=True,
                        help="Print the resolved config (preset, then --config, then flags) as YAML and exit.")(command)


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
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]()


def chosen_preset(flag: Optional[str], config_path: Optional[str | Path]) -> Optional[str]:
    """The whole-run preset a training command runs with: `--preset`, else the config file's
    `model.preset`. Wherever it is named, it chooses both the model and the training defaults, and
    the order is defaults < preset < file < flags (as HfArgumentParser and Ray users expect)."""
    if flag:
        return flag
    if config_path is None or not Path(config_path).is_file():
        return None  # no file, or load_config reports the missing one
    model = read_yaml(Path(config_path).read_text(), str(config_path)).get("model")
    return model.get("preset") if isinstance(model, Mapping) else None


def user_errors(*more: type):
    """Decorator for a click command: an error the user can act on (a bad setting, file or
    path: ValueError, FileNotFoundError, FileExistsError, plus the command's own `more`) is one
    `Error:` line and exit status 1, never a traceback; a target held by another run
    (`jobs.schedule.RunLocked`) is exit status 75 (EX_TEMPFAIL: skipped, try later)."""
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
            except (ValueError, FileNotFoundError, FileExistsError, *more) as e:
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
        raise ValueError(f"{what} {e}") from None
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {value} does not exist")
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
        raise ValueError(f"run_dir {value}: not a storage URI pyarrow can open ({e}); use a local path or "
                         f"s3://bucket/path, gs://bucket/path") from None
    bucket = path.split("/", 1)[0]
    if "/" not in path.strip("/"):
        raise ValueError(f"run_dir {value}: give a directory inside the bucket (s3://{bucket}/my-run), not the bucket itself")
    kind = storage.probe(loc, query=lambda: fs.get_file_info(bucket).type)
    if kind == pafs.FileType.NotFound:
        raise ValueError(f"run_dir {value}: bucket {bucket!r} does not exist (or these credentials can't see it); "
                         f"create it first")
    return loc


def load_deepspeed(value: Any) -> Optional[dict]:
    """`train.deepspeed` as a dict: a mapping (from YAML) as is, a string as the path of a DeepSpeed
    JSON file (`--deepspeed FILE`), read here on the driver so the workers get its content."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    path = Path(str(value))
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed config {path} does not exist (pass a DeepSpeed JSON file)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed config {path}: expected a JSON object, got {type(data).__name__}")
    return data
