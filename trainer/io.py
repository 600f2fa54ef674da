"""Storage over fsspec: local paths, `file://`, `memory://`, `gs://` (gcsfs) or any fsspec URL.

Writes are atomic: a file is written to a temporary name and renamed (local) or uploaded in one
object PUT (object stores show an object only once it is complete). A directory is published with
`commit_dir`: it appears under its final name only when complete, and carries a `_COMPLETE` marker so
readers never pick a half-written checkpoint on stores without atomic directory rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

COMPLETE_MARKER = "_COMPLETE"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for `url`."""
    return url_to_fs(str(url))


def is_local(url: str) -> bool:
    url = str(url)
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """Plain path of a local URL (`file:///x` -> `/x`)."""
    if not is_local(url):
        raise ValueError(f"not a local path: {url}")
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    url = str(url)
    for part in parts:
        url = url.rstrip("/") + "/" + str(part).lstrip("/")
    return url


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(Path(p.rstrip("/")).name for p in fs.ls(path, detail=False))


def glob(url: str, pattern: str) -> list[str]:
    """URLs under `url` matching `pattern` (e.g. "train_codes_*.npy"), sorted."""
    fs, path = filesystem(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url and not url.startswith("file://") else ""
    return sorted(protocol + p for p in fs.glob(path.rstrip("/") + "/" + pattern))


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    return fsspec.open(str(url), mode, **kwargs).open()


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(url):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # One PUT: object stores expose the object only when the upload completes.
        fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: str, obj: Any) -> None:
    write_text_atomic(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def is_complete(url: str) -> bool:
    """True when the directory `url` was published by `commit_dir`."""
    return exists(join(url, COMPLETE_MARKER))


def _umask() -> int:
    # Read, not set-and-restore: os.umask is process-wide, and another thread may be creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _readable_by_all(root: Path) -> None:
    """Modes as a plain write under the process's umask would give: the staging directory comes from
    mkdtemp (0700) and safetensors writes its files 0600, so a published checkpoint was readable only by
    its writer's uid: another pod of the run on the shared volume (a server image with another user, a
    copy made by a different account) got "No such file" for model.safetensors."""
    umask = _umask()
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def commit_dir(local_dir: str | Path, dest_url: str) -> None:
    """Publish a fully written local directory at `dest_url` atomically.

    Local destination: rename (atomic on one filesystem), marker written first. Remote: upload every
    file, then write the marker last; readers check `is_complete`.
    """
    local_dir = Path(local_dir)
    if is_local(dest_url):
        dest = Path(local_path(dest_url))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _readable_by_all(local_dir)
        (local_dir / COMPLETE_MARKER).write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(local_dir, dest)
        return
    fs, path = filesystem(dest_url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        fs.put_file(str(file), f"{path}/{rel}")
    fs.pipe_file(f"{path}/{COMPLETE_MARKER}", b"")


@contextmanager
def staged_dir(dest_url: str) -> Iterator[Path]:
    """A scratch directory that becomes `dest_url` (via `commit_dir`) only if the block succeeds."""
    if is_local(dest_url):
        parent = Path(local_path(dest_url)).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(local_path(dest_url)).name}.tmp-", dir=parent))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="staged-"))
    try:
        yield tmp
        commit_dir(tmp, dest_url)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def download_dir(url: str, local_dir: str | Path) -> Path:
    """Copy a remote directory to `local_dir` (no-op returning the path itself for local URLs)."""
    if is_local(url):
        return Path(local_path(url))
    fs, path = filesystem(url)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir
