"""What every hostile case asserts, and the tools to build one.

A refused case: the exit status (2, or 130 for an interrupt), exactly one line on stderr
that starts with ``PROG: error:`` (or ``PROG: interrupted``), no traceback, and the work
folder exactly as it was (no temporary file or folder left, a pre-existing target
unchanged byte for byte): :func:`assert_refused` and :func:`snapshot`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from litedge.bundle import MANIFEST_NAME, file_sha256, tokenizer_entries


def run(main, argv, capfd) -> tuple[int, str, str]:
    """``main(argv)`` in process; (exit status, stdout, stderr). argparse's SystemExit counts as a status."""
    capfd.readouterr()
    try:
        code = main([os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def assert_refused(code, err: str, *fragments: str, status: int = 2, prog: str | None = None) -> str:
    """One stderr line, the status, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == status, f"exit {code}, expected {status}; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {err!r}"
    line = lines[0]
    if prog is not None:
        assert line.startswith(f"{prog}: error: " if status == 2 else f"{prog}: interrupted"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included): relative path -> content hash / link target / kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(full)
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            elif stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            else:
                out[rel] = f"special:{stat.S_IFMT(mode)}"
    return out


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(bundle: Path) -> None:
    """Recompute every sha256 in the manifest, as an attacker who edits files would."""
    def fix(data):
        for comp in data["components"].values():
            comp["sha256"] = file_sha256(bundle / comp["file"])
            for extra in comp.get("extra_files", []):
                extra["sha256"] = file_sha256(bundle / extra["file"])
        tokenizer = data.get("tokenizer")
        for key, entry in tokenizer_entries(tokenizer).items():
            if "path" in entry:
                target = tokenizer if key == "tokenizer" else tokenizer["extra"][key]
                target["sha256"] = file_sha256(bundle / entry["path"])
    edit_manifest(bundle, fix)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
