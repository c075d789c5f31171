"""Atomic writes: a crash mid-write leaves the previous file(s) or folder intact."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

Writer = Callable[[str], None]


def atomic_write_group(items: Sequence[tuple[str | os.PathLike, Writer]]) -> None:
    """Call each ``write(tmp_path)`` in order, then move every result over its path.

    Nothing is replaced until all writes succeeded, so a failure or interruption leaves all the
    previous files in place (files that belong together never end up mixed)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
        for tmp, _ in staged:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Writer) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one rename."""
    atomic_write_group([(path, write)])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block succeeds it becomes ``path``.

    On failure the staging folder is removed and ``path`` is untouched. An existing ``path`` is moved
    aside, replaced, and deleted only once the new folder is in place (callers decide whether it may
    be replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        old = path.parent / f".{staging.name}.old" if path.exists() else None
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def json_writer(obj) -> Writer:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2) + "\n")

    return write


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json_writer(obj))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
