"""Directories written all at once: a temporary sibling, renamed into place when complete (torch-free).

A process killed half way leaves only a hidden ``.NAME.tmp-<pid>-<random>`` folder, never a
half-written ``NAME`` that a loader would accept. Replacing an existing ``NAME`` sets it
aside as ``.NAME.old-<pid>-<random>`` first, moves the new one in, then deletes the old one.

The writer's pid is in every temporary name, so the next run for the same output can tell
the leftovers of a killed run (pid no longer alive) from those of a run still going, and
:func:`recover_interrupted` (called when a write starts) puts an old ``NAME`` that was set
aside back if the new one never arrived, and deletes the dead run's temporaries. Only
litedge's own names are touched, and only when the process that made them is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from litedge.errors import LitedgeError
from litedge.safe_write import dead_writer_entries, fsync_dir, pid_alive, temp_name

StrPath = str | os.PathLike


def _remove(path: Path) -> bool:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    except OSError:
        return False


def recover_interrupted(dst: StrPath) -> tuple[Path | None, list[Path]]:
    """Undo what a killed write to ``dst`` left: returns (restored path or None, removed paths).

    If ``dst`` is missing and a dead writer's ``.NAME.old-<pid>-*`` copy exists (killed
    between "old set aside" and "new moved in"), the newest such copy is renamed back to
    ``dst``. Every other ``.NAME.old-*`` / ``.NAME.tmp-*`` of a dead pid is deleted. Entries
    of live processes, and any name litedge does not make, are left alone.
    """
    dst = Path(os.path.abspath(dst))
    folder, name = dst.parent, re.escape(dst.name)
    olds = dead_writer_entries(folder, re.compile(rf"\.{name}\.old-(\d+)(?:-[0-9a-f]{{16}})?"))
    tmps = dead_writer_entries(folder, re.compile(rf"\.{name}\.tmp-(\d+)-[0-9a-f]{{16}}"))
    restored = None
    if olds and not os.path.lexists(dst):
        def mtime(p: Path) -> float:
            try:
                return os.lstat(p).st_mtime
            except OSError:
                return 0.0

        newest = max(olds, key=mtime)
        try:
            os.rename(newest, dst)
            restored = dst
            olds.remove(newest)
            fsync_dir(folder)
        except OSError:
            pass
    removed = [p for p in olds + tmps if _remove(p)]
    return restored, removed


def clean_dead_temps(folder: StrPath) -> list[Path]:
    """Delete every ``.NAME.tmp-<pid>-<random>`` / ``.NAME.old-<pid>-<random>`` in ``folder`` whose pid
    is dead and whose ``NAME`` exists (an old copy whose ``NAME`` is missing is left to
    :func:`recover_interrupted`). Returns the removed paths."""
    folder = Path(folder)
    pattern = re.compile(r"\.(.+)\.(tmp|old)-(\d+)-[0-9a-f]{16}")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or pid_alive(int(match.group(3))):
            continue
        if match.group(2) == "old" and not os.path.lexists(folder / match.group(1)):
            continue
        if _remove(folder / name):
            removed.append(folder / name)
    return removed


def make_temp_dir(dst: StrPath) -> Path:
    """Create an empty ``.NAME.tmp-<pid>-<random>`` directory beside ``dst`` (exclusive, umask honoured)."""
    dst = Path(os.path.abspath(dst))
    while True:
        tmp = dst.parent / temp_name(dst.name)
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``; an existing ``dst`` is set aside first, then deleted.

    A kill between the two renames leaves the old ``dst`` as ``.NAME.old-<pid>-*``, which the
    next :func:`recover_interrupted` for ``dst`` moves back.
    """
    src, dst = Path(src), Path(dst)
    if os.path.lexists(dst):
        old = dst.with_name(temp_name(dst.name, "old"))
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            try:
                os.replace(old, dst)
            except OSError:
                pass
            raise
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
        fsync_dir(dst.parent)


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it becomes ``out``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out`` is left as it was. A killed earlier write to ``out`` is recovered first.
    An ``OSError`` while moving into place (EIO, disk full) becomes a one-line
    :class:`LitedgeError`.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(out)
    tmp = make_temp_dir(out)
    try:
        yield tmp
        try:
            replace_dir(tmp, out)
        except OSError as e:
            raise LitedgeError(f"cannot move the finished {out.name} into place at {out} ({e.strerror}); "
                               f"what was there is unchanged; free space or fix the folder and retry") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
