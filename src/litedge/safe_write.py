"""Files written safely: a private temporary beside the target, renamed over it (torch-free).

Every file litedge writes for a user (profile reports and plots, PNGs, manifests, loss
logs, checkpoint pointers) goes through :func:`write_file`, which follows the habits of
git's lock files and rsync's temp-then-rename:

- the target is refused when it exists and is not a regular file (a device node such as
  ``/dev/full``, a FIFO, a folder, or a symlink: nothing is ever written through a link);
- the temporary is created in the target's own folder with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` under an unpredictable name, ``.NAME.tmp-<pid>-<random>``, so a file or
  symlink planted in advance can never be written through;
- it is flushed to disk, then renamed over the target (atomic on POSIX and NTFS): a reader
  sees the old file or the new one, never half of one; on any error (disk full, EIO,
  Ctrl-C) the temporary is removed and the target is left as it was;
- the temporaries of earlier runs that were killed (their pid no longer alive) are
  removed when the next write to the same target starts (:func:`clean_stale_files`).

::

    write_text("report.csv", text)                 # or write_file(path, lambda f: f.write(b"..."))
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from litedge.errors import LitedgeError

StrPath = str | os.PathLike

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists (a process we may not signal counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_name(target_name: str, kind: str = "tmp") -> str:
    """The hidden name of a temporary for ``target_name``: ``.NAME.<kind>-<pid>-<16 hex>``."""
    return f".{target_name}.{kind}-{os.getpid()}-{secrets.token_hex(8)}"


def temp_pattern(target_name: str, kinds: tuple[str, ...] = ("tmp",)) -> re.Pattern:
    """Matches the temporaries :func:`temp_name` makes for ``target_name``; group 1 is the pid."""
    return re.compile(rf"\.{re.escape(target_name)}\.(?:{'|'.join(kinds)})-(\d+)-[0-9a-f]{{16}}")


def stale_entries(folder: Path, target_name: str, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """litedge's own temporaries for ``target_name`` in ``folder`` whose writing process is dead."""
    return sorted(dead_writer_entries(folder, temp_pattern(target_name, kinds)))


def dead_writer_entries(folder: Path, pattern: re.Pattern) -> list[Path]:
    """Entries of ``folder`` whose name fully matches ``pattern`` and whose group 1 (a pid) is no live process."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                match = pattern.fullmatch(entry.name)
                if match and not pid_alive(int(match.group(1))):
                    found.append(Path(entry.path))
    except OSError:
        return []
    return found


def clean_stale_files(target: StrPath) -> list[Path]:
    """Remove the temporary files of killed writes to ``target`` (regular files and links only)."""
    target = Path(os.path.abspath(target))
    removed = []
    for path in stale_entries(target.parent, target.name):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def check_target(path: StrPath, what: str = "output") -> Path:
    """Refuse a target that exists and is not a regular file; refuse a missing folder. Returns it absolute."""
    path = Path(os.path.abspath(path))
    shown = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # missing, or a file where a folder should be
        mode = None
    except OSError as e:
        raise LitedgeError(f"{shown}: cannot check the {what} path ({e.strerror}); choose another path") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a device or FIFO, not a regular file")
        raise LitedgeError(f"{shown} exists and is {kind}; litedge replaces only regular files: "
                           f"give a file path for the {what}")
    folder = path.parent
    if not folder.is_dir():
        raise LitedgeError(f"{shown}: the folder {folder} does not exist; create it or choose another {what} path")
    return path


def _message(path: Path, e: OSError) -> str:
    reason = e.strerror or type(e).__name__
    if e.errno == errno.ENOSPC:
        return f"cannot write {path} ({reason}): the disk is full; free space or choose another path"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path} ({reason}): the folder is not writable; choose another path"
    return f"cannot write {path} ({reason}); nothing was changed there; choose another path or retry"


def write_file(path: StrPath, write: Callable[[BinaryIO], None], *, what: str = "output", durable: bool = True) -> Path:
    """Write a file at ``path`` all at once; ``write(f)`` fills the binary temporary ``f``.

    Returns the absolute path. Raises :class:`LitedgeError` (one line) for a target that is
    not a regular file, a missing or read-only folder, a full disk or any I/O error; the
    target is then unchanged and no temporary is left behind. Other exceptions raised by
    ``write`` (KeyboardInterrupt included) propagate after the temporary is removed.
    """
    path = check_target(path, what)
    clean_stale_files(path)
    tmp = path.parent / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)
    except OSError as e:
        raise LitedgeError(_message(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        check_target(path, what)  # nothing special appeared there while writing
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise LitedgeError(_message(path, e)) from None
    except BaseException:
        _unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_bytes(path: StrPath, data: bytes, **kwargs) -> Path:
    """:func:`write_file` of ``data``."""
    return write_file(path, lambda f: f.write(data), **kwargs)


def write_text(path: StrPath, text: str, encoding: str = "utf-8", **kwargs) -> Path:
    """:func:`write_file` of ``text`` encoded (UTF-8 by default)."""
    return write_bytes(path, text.encode(encoding), **kwargs)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: StrPath) -> None:
    """Make a rename in ``path`` durable, best effort (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
