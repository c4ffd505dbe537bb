"""Run directories and outputs on any `pyarrow.fs` location: a local path or a URI.

Contract:
- A *location* is a local path or a URI that `pyarrow.fs.FileSystem.from_uri` understands
  (`s3://bucket/key`, `gs://...`, `file:///abs`). Code that may see a URI goes through these
  helpers, never `pathlib`: `Path("s3://b/run")` is a directory named `s3:` under the working dir.
- `normalize(loc)`: a local path made absolute (`file://` stripped); a URI kept, trailing `/` dropped.
  `canonical(loc)` also resolves symlinks: one spelling per location, for comparing paths
  (`overlaps`: the same location, or one inside the other).
- `entries(loc)`: everything under a directory as (relative path, "file" | "dir" | "link"), never
  following a symlink below `loc` (pyarrow's recursive listing follows them locally);
  `remove_file` and `remove_empty_dir` delete one entry, never through a symlink: with them, a
  caller that deletes only what `entries` showed it stays inside `loc`.
- `exists`, `listing` (recursive, following local symlinks), `read_text` / `read_bytes` (None when
  absent), `write_text` / `write_bytes`, and `replacing(loc)`, the one atomic write every writer
  goes through (a hidden `temp_name` renamed locally, the object itself on a store);
  `remove_temp_files` (a resumed job's own leftovers),
  `append_line` (O_APPEND locally; read and rewrite on an object store, so callers must hold the
  run's lock), `list_names`, `upload`, `download_tree`, `replace_tree` (copy a directory over
  another, deleting what was there).
- `cached_copy(loc)`: a model or tokenizer location as a local path, a URI downloaded once per
  node (and per version of its files) into `$RAYBERT_CACHE` (default `~/.cache/raybert`). Every
  process that loads a model or tokenizer (driver checks, training workers, tokenize tasks,
  predictor actors) calls it, so each node fetches its own copy.
- Errors from a store that can't be reached (network, credentials, a missing bucket) become a
  `ValueError` naming the URI and what to check (`reachable`), never a pyarrow traceback.
- Object stores are reached as pyarrow reaches them: for S3, the usual AWS settings
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and `AWS_ENDPOINT_URL` for an
  S3-compatible server such as MinIO), on the driver and on every node.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Callable, Iterator, Optional

from pipelines import MissingPath, UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(loc) -> bool:
    """A URI other than file:// (those are local paths)."""
    return bool(loc) and bool(_URI.match(str(loc))) and not str(loc).startswith("file://")


def normalize(loc: str) -> str:
    loc = str(loc)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    if is_uri(loc):
        return loc.rstrip("/")
    return os.path.abspath(loc)


def join(loc: str, *parts: str) -> str:
    if is_uri(loc):
        return "/".join([str(loc).rstrip("/"), *parts])
    return os.path.join(loc, *parts)


def basename(loc: str) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def parent(loc: str) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[0] if is_uri(loc) else os.path.dirname(os.path.abspath(loc))


@contextlib.contextmanager
def reachable(loc: str) -> Iterator[None]:
    """Turn pyarrow's failure to reach an object store (no network, no credentials, a bad bucket)
    into an error that names the URI, instead of a pyarrow traceback."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException) as e:
        if not is_uri(loc):
            raise
        raise UserError(f"{loc}: the store could not be reached ({type(e).__name__}: {e}); check the URI, "
                         f"the network and the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                         f"AWS_ENDPOINT_URL for an S3-compatible server)") from None


def filesystem(loc: str):
    """(pyarrow FileSystem, path within it) for a location."""
    import pyarrow.fs as pafs

    import pyarrow as pa

    if is_uri(loc):
        try:
            return pafs.FileSystem.from_uri(str(loc))
        except pa.ArrowInvalid as e:  # an unknown scheme or a malformed URI: nothing to reach
            raise UserError(f"{loc}: not a storage URI pyarrow can open ({e}); use a local path or "
                             f"s3://bucket/path, gs://bucket/path") from None
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{loc}: the store could not be reached ({type(e).__name__}: {e}); check the URI, "
                             f"the network and the credentials") from None
    return pafs.LocalFileSystem(), normalize(loc)


def file_type(loc: str):
    fs, path = filesystem(loc)
    with reachable(loc):
        return fs.get_file_info(path).type


def probe(loc: str, timeout_s: float = 30.0, query=None):
    """`file_type(loc)` (or `query()`, a call on `loc`'s store) for a driver-side check that must
    not hang: a store that doesn't answer within `timeout_s` (pyarrow's GCS client retries for many
    minutes without a network) is a ValueError naming the URI."""
    import threading

    result: dict = {}

    def run():
        try:
            with reachable(loc):
                result["value"] = query() if query is not None else file_type(loc)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    worker = threading.Thread(target=run, name="raybert-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise UserError(f"{loc}: the store did not answer within {timeout_s:.0f} s; check the URI, the network "
                         f"and the credentials")
    if "error" in result:
        raise result["error"]
    return result["value"]


def exists(loc: str) -> bool:
    import pyarrow.fs as pafs

    return file_type(loc) != pafs.FileType.NotFound


def is_dir(loc: str) -> bool:
    import pyarrow.fs as pafs

    return file_type(loc) == pafs.FileType.Directory


def canonical(loc: str) -> str:
    """One spelling per location, for comparing paths: a local path (plain, relative or `file://`)
    becomes absolute with symlinks resolved; another URI loses its trailing slashes."""
    loc = normalize(loc)
    return loc if is_uri(loc) else os.path.realpath(loc)


def overlaps(a: str, b: str) -> bool:
    """The same path, or one inside the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def listing(loc: str) -> list:
    """pyarrow FileInfo of everything under directory `loc`, recursively (empty when it is not a
    directory). Locally pyarrow follows symlinked directories: use `entries` to decide what is
    inside `loc`."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    with reachable(loc):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(path, recursive=True))


def entries(loc: str) -> list[tuple[str, str]]:
    """Everything under directory `loc` (`loc` itself may be a symlink to one), sorted, as (path
    relative to `loc` with `/` separators, kind): "file", "dir", or "link" for a local symlink, which
    is reported, never followed: a caller deciding what is in `loc` (or what to delete) sees only
    what is inside it. Empty when `loc` is not a directory."""
    import pyarrow.fs as pafs

    if is_uri(loc):  # object stores have no symlinks
        base = filesystem(loc)[1].rstrip("/")
        return sorted((i.path[len(base):].lstrip("/"), "dir" if i.type == pafs.FileType.Directory else "file")
                      for i in listing(loc))
    root, found, todo = normalize(loc), [], [""]
    if not os.path.isdir(root):
        return []
    while todo:
        below = todo.pop()
        with os.scandir(os.path.join(root, below)) as it:
            for e in it:
                rel = f"{below}/{e.name}" if below else e.name
                kind = "link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False) else "file"
                found.append((rel, kind))
                if kind == "dir":
                    todo.append(rel)
    return sorted(found)


def remove_file(loc: str) -> None:
    """Delete one file (a local symlink: the link, never its target); nothing if absent."""
    if not is_uri(loc):
        with contextlib.suppress(FileNotFoundError):
            os.remove(normalize(loc))
        return
    fs, path = filesystem(loc)
    with reachable(loc), contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def remove_empty_dir(loc: str) -> None:
    """Delete directory `loc` if it holds nothing; a local symlink (even to an empty directory) is
    left as it is. On an object store this also drops the empty-directory marker pyarrow leaves."""
    if not is_uri(loc):
        path = normalize(loc)
        if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
            os.rmdir(path)
        return
    fs, path = filesystem(loc)
    if is_dir(loc) and not listing(loc):
        with reachable(loc):
            fs.delete_dir(path)


def list_names(loc: str) -> list[str]:
    """Names directly under directory `loc` (empty when it is not a directory)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    with reachable(loc):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path)))


def read_text(loc: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    data = read_bytes(loc)
    return None if data is None else data.decode()


def write_text(loc: str, text: str) -> None:
    """Replace the file whole: readers see the old text or the new, never a part."""
    write_bytes(loc, text.encode())


def write_bytes(loc: str, data: bytes) -> None:
    """Replace the file whole (see `replacing`)."""
    with replacing(loc) as (fs, path), fs.open_output_stream(path) as f:
        f.write(data)


def temp_name(path: str) -> str:
    """The one temp-file name raybert writes through locally: a hidden sibling, `.<name>.<pid>.tmp`
    (listings and readers skip "." files; the pid keeps two writers apart)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


@contextlib.contextmanager
def replacing(loc: str) -> Iterator[tuple]:
    """The one atomic write: yields (filesystem, path) to write `loc`'s new content to, whole.
    Locally the path is `temp_name(loc)`, renamed over `loc` when the block ends (removed if it
    raises): readers see the old file or the new, never a part. On an object store it is `loc`
    itself: an object appears only when its upload completes (no temp object, no copy-and-delete
    move). A kill can leave a local temp file: `remove_temp_files` clears a job's own on resume."""
    fs, path = filesystem(loc)
    if is_uri(loc):
        with reachable(loc):
            yield fs, path
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield fs, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def remove_temp_files(directory: str, owned: Callable[[str], bool]) -> list[str]:
    """Delete the temp files (`*.tmp`) a killed writer left under a local `directory` whose path
    relative to it `owned` says is the job's own; returns them. Nothing on an object store, which
    holds no partial object."""
    if is_uri(directory):
        return []
    gone = []
    for rel, kind in entries(directory):
        if kind == "file" and rel.endswith(".tmp") and owned(rel):
            remove_file(join(directory, rel))
            gone.append(rel)
    return gone


def read_bytes(loc: str) -> Optional[bytes]:
    """The file's bytes, or None when it does not exist."""
    if not is_uri(loc):
        try:
            with open(normalize(loc), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    fs, path = filesystem(loc)
    with reachable(loc):
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None


def append_line(loc: str, line: str) -> None:
    """Add one line. Locally a single O_APPEND write; on an object store (no append) a read and a
    rewrite, so concurrent writers must be excluded by the caller (the run lock)."""
    if not line.endswith("\n"):
        line += "\n"
    if not is_uri(loc):
        fd = os.open(normalize(loc), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return
    write_text(loc, (read_text(loc) or "") + line)


def delete(loc: str) -> None:
    """Delete a file or a directory tree; nothing if absent."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    with reachable(loc):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)


def upload(local_path: str, loc: str) -> None:
    """Copy a local file or directory tree to `loc` (files under it are overwritten, others kept)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    with reachable(loc):
        pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_tree(loc: str, local_dir: str) -> None:
    """Copy directory `loc` (or one file) to `local_dir`."""
    import pyarrow.fs as pafs

    fs, path = filesystem(loc)
    with reachable(loc):
        is_tree = fs.get_file_info(path).type == pafs.FileType.Directory
        os.makedirs(local_dir if is_tree else os.path.dirname(os.path.abspath(local_dir)), exist_ok=True)
        pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def replace_tree(src: str, dst: str) -> None:
    """Make directory `dst` a copy of directory `src` (either may be local or remote). Locally the
    copy is built beside `dst` and renamed over it; on an object store, which has no rename, the
    old objects are deleted first."""
    import shutil

    import pyarrow.fs as pafs

    src_fs, src_path = filesystem(src)
    if not is_uri(dst):
        dst = normalize(dst)
        tmp = dst + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        download_tree(src, tmp)
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(dst):
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    delete(dst)
    dst_fs, dst_path = filesystem(dst)
    with reachable(dst):
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextlib.contextmanager
def local_copy(loc: str, files: Optional[tuple[str, ...]] = None) -> Iterator[str]:
    """A local directory holding `loc`'s content (the given `files` only, those that exist, when
    set): `loc` itself when local, else a temporary download removed on exit."""
    if not is_uri(loc):
        yield normalize(loc)
        return
    with tempfile.TemporaryDirectory(prefix="raybert-") as tmp:
        if files is None:
            download_tree(loc, tmp)
        else:
            for name in files:
                if exists(join(loc, name)):
                    download_tree(join(loc, name), os.path.join(tmp, name))
        yield tmp


def cache_root() -> str:
    return os.environ.get("RAYBERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raybert")


def cached_copy(loc: Optional[str]) -> Optional[str]:
    """A local path for a model or tokenizer location (a directory or one file): `loc` itself
    (made absolute) when local; for a URI, a copy in this node's cache (`$RAYBERT_CACHE`, default
    `~/.cache/raybert`), downloaded once per node and version. The cache key covers the URI and
    every file's size and modification time, so a model overwritten in place is fetched again;
    processes on one node that ask at once wait on a file lock while one of them downloads."""
    import fcntl
    import hashlib
    import shutil

    import pyarrow.fs as pafs

    if loc is None or not is_uri(loc):
        return normalize(loc) if loc else loc
    fs, path = filesystem(loc)
    with reachable(loc):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingPath(f"{loc} does not exist")
        files = ([info] if info.type == pafs.FileType.File else
                 [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File])
    version = "\n".join(sorted(f"{i.path}|{i.size}|{i.mtime_ns}" for i in files))
    key = hashlib.sha256(f"{loc}\n{version}".encode()).hexdigest()[:20]
    root = os.path.join(cache_root(), "remote")
    dest, done = os.path.join(root, key, basename(loc)), os.path.join(root, key + ".done")
    if os.path.exists(done):
        return dest
    os.makedirs(os.path.join(root, key), exist_ok=True)
    with open(os.path.join(root, key + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not os.path.exists(done):
            shutil.rmtree(dest, ignore_errors=True)
            if os.path.isfile(dest):
                os.remove(dest)
            download_tree(loc, dest)
            with open(done, "w") as f:
                f.write(loc + "\n")
    return dest


class Mirror:
    """Keeps a remote directory in step with a local staging directory: `sync()` uploads the files
    that changed since the last sync (by size and mtime). For files that are appended to (metrics,
    TensorBoard events), which an object store can't append to."""

    def __init__(self, local_dir: str, loc: str):
        self.local_dir, self.loc = local_dir, loc
        self._seen: dict[str, tuple[int, int]] = {}

    def sync(self) -> None:
        for dirpath, _, filenames in os.walk(self.local_dir):
            for name in sorted(filenames):
                if name.endswith(".tmp"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(path) == key:
                    continue
                rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                upload(path, join(self.loc, rel))
                self._seen[path] = key
