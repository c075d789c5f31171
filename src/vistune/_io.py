"""Atomic file writes: a crash mid-write leaves the previous file(s) intact."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
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
