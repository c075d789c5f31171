"""Atomic writes: a crash mid-write leaves the previous file(s) or folder intact.

A file is written to a temp file ``.<name>.XXXXXXXX.tmp`` beside it, a folder into a staging folder
``.<name>.partial-XXXXXXXX``, then renamed over the target. The writer holds an exclusive ``flock`` on each
while it works (a library that writes by replacing the file, as safetensors does, leaves it unlocked only while
it writes, when its age still marks it live), so :func:`remove_stale_temps` can tell what a killed writer left
(unlocked, and older than this process) from a live writer's, and removes only those. A new file gets the mode ``open()`` would give it (0666
less the umask; a folder 0777 less the umask), a replaced one keeps its mode. A write that fails for lack of
disk space is a :class:`~vistune.errors.VistuneError` saying so.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import VistuneError

try:
    import fcntl
except ImportError:  # no flock (Windows): a temp file is judged stale by its age alone
    fcntl = None

Writer = Callable[[str], None]
log = logging.getLogger("vistune")

# a temp file newer than this process may be a live writer's; an older one that no writer holds locked is a leftover
_STARTED = time.time()
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's 8 random characters
_STAGING = re.compile(r"\.(?P<name>.+)\.partial-[a-z0-9_]{8}(?:\.old)?")  # atomic_dir's folders


def atomic_write_group(items: Sequence[tuple[str | os.PathLike, Writer]]) -> None:
    """Call each ``write(tmp_path)`` in order, then move every result over its path.

    Nothing is replaced until all writes succeeded, so a failure or interruption leaves all the
    previous files in place (files that belong together never end up mixed)."""
    staged: list[tuple[str, Path]] = []
    held: list[int | None] = []  # locked descriptors of the temp files
    try:
        for path, write in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            held.append(fd)
            _lock(fd)
            write(tmp)
            if os.stat(tmp).st_ino != os.fstat(fd).st_ino:  # the writer replaced the file (safetensors does)
                held.append(_lock_path(Path(tmp)))
            os.chmod(tmp, _mode_for(path, directory=False))  # mkstemp's 0600 (or the writer's) otherwise
        for tmp, _ in staged:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException as e:
        where = staged[-1][1] if staged else None
        full = where is not None and _out_of_space(e, where.parent)
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if full:
            raise _no_space(where) from e
        raise
    finally:
        _unlock(held)


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
    remove_stale_temps(path.parent, name=path.name)
    mode = _mode_for(path, directory=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    locks = [_lock_path(staging)]
    old = None
    try:
        os.chmod(staging, mode)
        yield staging
        if path.exists():
            locks.append(_lock_path(path))  # the lock moves with the folder: its removal is a live writer's
            old = path.parent / f".{staging.name}.old"
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException as e:
        full = _out_of_space(e, path.parent)
        shutil.rmtree(staging, ignore_errors=True)
        _unlock(locks)
        if full:
            raise _no_space(path) from e
        raise
    if old is not None:
        shutil.rmtree(old)
    _unlock(locks)


def remove_stale_temps(folder: str | os.PathLike, *, name: str | None = None) -> list[Path]:
    """Remove what killed writers left in ``folder``: temp files and staging folders of this module's naming
    (of target ``name`` only, when given) that no writer holds locked and that are older than this process.
    Nothing else is touched: not other files, not symbolic links, not a live writer's temp files. Returns the
    removed paths."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_FILE.fullmatch(entry.name) or _STAGING.fullmatch(entry.name)
        # a folder moved aside (".old") is named after its staging folder: one more leading dot
        if match is None or (name is not None and match["name"] not in (name, f".{name}")):
            continue
        is_staging = match.re is _STAGING
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not (stat.S_ISDIR(info.st_mode) if is_staging else stat.S_ISREG(info.st_mode)):
            continue
        if info.st_mtime >= _STARTED:
            continue
        lock = _try_lock(entry.path)
        if lock is False:
            continue  # a writer is at work on it
        try:
            if is_staging:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            if lock is not None:
                os.close(lock)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _lock_path(path: Path) -> int | None:
    """An exclusive lock on a file or folder (its open descriptor), or None where it cannot be opened/locked."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    _lock(fd)
    return fd


def _unlock(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _try_lock(path: str) -> int | None | bool:
    """The descriptor of ``path`` locked by us (None: cannot lock here, judged by age alone), or False when
    another writer holds it locked or it cannot be opened (then it is left alone)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return fd


def _umask() -> int:
    try:  # Linux: read it, without changing it (os.umask sets it, and threads share it)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, *, directory: bool) -> int:
    """The permissions a new ``path`` gets from ``open()``/``mkdir()`` (the umask applied); an existing one's own."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return (0o777 if directory else 0o666) & ~_umask()


def _out_of_space(error: BaseException, folder: Path) -> bool:
    if not isinstance(error, Exception) or isinstance(error, VistuneError):
        return False  # an interruption, or an error that says what it is
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(error)
    if "No space left" in text or "os error 28" in text or "StorageFull" in text:
        return True  # safetensors / other libraries wrap the OSError in their own exception
    try:  # torch.save says only "file write failed": judge by what the disk has left
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _no_space(path: Path) -> VistuneError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return VistuneError(
        f"no space left on the disk of {path.parent} while writing {path.name} ({free})",
        "free some disk space, or write to a folder on another disk; the files that were there are unchanged",
    )


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
