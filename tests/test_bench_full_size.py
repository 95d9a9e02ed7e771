"""bench/full_size.py's watchdog: it sees the memory of the export's child processes and kills them too."""

import importlib.util
import os
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("full_size", ROOT / "bench" / "full_size.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["full_size"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_watchdog_counts_a_child_process_and_kills_the_whole_tree(tmp_path):
    """The parent holds almost nothing; its child holds ~400 MB (as lit-export's QNN compile
    children do). A 200 MB limit must kill both, the child included."""
    pid_file = tmp_path / "child.pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "b = b'x' * (400 << 20); time.sleep(60)")
    parent = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {child!r}])
    """)
    start = time.perf_counter()
    r = _bench().run([sys.executable, "-c", parent], rss_limit=200 << 20, timeout=50)
    assert time.perf_counter() - start < 40
    assert "killed by the bench's watchdog" in r.output and r.returncode != 0
    pid = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the child outlived the kill")
