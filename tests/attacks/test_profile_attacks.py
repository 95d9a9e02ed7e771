"""lit-profile on hostile input: sizes, report paths it must not clobber, tampered bundles, missing matplotlib.

Every case: exit 2, one stderr line, no traceback, the work folder unchanged (an existing
report keeps its bytes; no ``.NAME.tmp`` left).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from litedge.cli.profile import main
from tests.attacks.helpers import assert_refused, run, snapshot
from tests.attacks.test_generate_attacks import TAMPERED

OLD = "old report\n"
FAST = ["--repeat", "1", "--steps", "1", "-q"]


def refused(capfd, work: Path, argv: list, *fragments: str) -> str:
    for name in ("r.csv", "r.json", "p.png"):
        if not os.path.lexists(work / name):
            (work / name).write_text(OLD)
    before = snapshot(work)
    code, _, err = run(main, argv, capfd)
    line = assert_refused(code, err, *fragments, prog="lit-profile")
    assert snapshot(work) == before
    return line


SIZES = {
    "trailing_x": ("64x", "expected sizes like"),
    "leading_x": ("x64", "expected sizes like"),
    "empty": ("", "expected sizes like"),
    "only_commas": (",,", "expected sizes like"),
    "word": ("big", "expected sizes like"),
    "float": ("64.0", "expected sizes like"),
    "zero": ("0", "positive multiples of 16"),
    "negative": ("-64", "positive multiples of 16"),
    "not_multiple": ("65", "positive multiples of 16"),
    "not_multiple_width": ("64x72", "positive multiples of 16"),
    "huge": ("100000", "needs about"),
    "huge_after_a_good_one": ("64,100000", "needs about"),
    "huge_width": ("64x16000000", "needs about"),
}


@pytest.mark.parametrize("case", sorted(SIZES))
def test_bad_sizes_refused(case, session_bundle, tmp_path, capfd):
    sizes, fragment = SIZES[case]
    refused(capfd, tmp_path, [session_bundle, "--sizes", sizes, *FAST, "--csv", tmp_path / "r.csv"], fragment)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


TARGETS = {
    "csv_fifo": ("--csv", lambda w: _fifo(w / "f.csv"), "a device or FIFO"),
    "json_fifo": ("--json", lambda w: _fifo(w / "f.json"), "a device or FIFO"),
    "plot_fifo": ("--plot", lambda w: _fifo(w / "f.png"), "a device or FIFO"),
    "csv_dev_full": ("--csv", lambda w: Path("/dev/full"), "a device or FIFO"),
    "json_dev_full": ("--json", lambda w: Path("/dev/full"), "a device or FIFO"),
    "plot_dev_null": ("--plot", lambda w: Path("/dev/null"), "a device or FIFO"),
    "csv_directory": ("--csv", lambda w: w, "a directory"),
    "plot_directory": ("--plot", lambda w: (w / "d").mkdir() or w / "d", "a directory"),
    "plot_missing_folder": ("--plot", lambda w: w / "nope" / "p.png", "does not exist"),
    "json_missing_folder": ("--json", lambda w: w / "nope" / "r.json", "does not exist"),
    "csv_symlink": ("--csv", lambda w: (w / "l.csv").symlink_to(w / "r.csv") or w / "l.csv", "a symlink"),
    "json_symlink_to_passwd": ("--json", lambda w: (w / "l.json").symlink_to("/etc/passwd") or w / "l.json",
                               "a symlink"),
    "plot_dangling_symlink": ("--plot", lambda w: (w / "l.png").symlink_to(w / "gone") or w / "l.png", "a symlink"),
    "csv_below_a_file": ("--csv", lambda w: w / "r.json" / "r.csv", "does not exist"),
    "csv_empty": ("--csv", lambda w: "", "a directory"),  # argparse's Path("") is "."
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
@pytest.mark.parametrize("case", sorted(TARGETS))
def test_report_target_refused_before_measuring(case, session_bundle, tmp_path, capfd, monkeypatch):
    flag, make, fragment = TARGETS[case]
    target = make(tmp_path)
    if isinstance(target, Path) and str(target).startswith("/dev/") and not os.path.exists(target):
        pytest.skip(f"no {target}")
    from litedge.profile import measure

    def never(*a, **k):
        raise AssertionError("measured before checking the report paths")
    monkeypatch.setattr(measure, "profile_bundle", never)
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *FAST, flag, target], fragment)
    if str(target).startswith("/dev/"):
        assert not os.path.isfile(target)


def test_two_reports_on_one_file(session_bundle, tmp_path, capfd):
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *FAST, "--csv", tmp_path / "r.csv", "--json",
                              tmp_path / "r.csv"], "both write")


def test_plot_without_matplotlib_is_refused_before_measuring(session_bundle, tmp_path, capfd, monkeypatch):
    from litedge.profile import measure

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(measure, "profile_bundle", lambda *a, **k: pytest.fail("measured before the check"))
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *FAST, "--plot", tmp_path / "p.png"],
            "--plot needs matplotlib")


@pytest.mark.parametrize("flag", ["--csv", "--json"])
def test_disk_full_writing_a_report_keeps_the_old_one(flag, session_bundle, tmp_path, capfd, monkeypatch):
    import errno

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / ("r.csv" if flag == "--csv" else "r.json")
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *FAST, flag, target], "disk is full")


def test_disk_full_writing_the_plot(session_bundle, tmp_path, capfd, monkeypatch):
    import errno

    pytest.importorskip("matplotlib")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *FAST, "--plot", tmp_path / "p.png"], "disk is full")


def test_planted_symlink_at_the_old_temp_name_is_never_followed(session_bundle, tmp_path, capfd):
    """Not a refusal: ``.r.csv.tmp`` used to be the fixed temp name; its target keeps its bytes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".r.csv.tmp").symlink_to(victim)
    code, _, err = run(main, [session_bundle, "--sizes", "64", *FAST, "--csv", tmp_path / "r.csv"], capfd)
    assert code == 0, err
    assert victim.read_text() == "precious" and (tmp_path / "r.csv").read_text().startswith("bundle,")


# every other bundle attack, through lit-profile this time (it feeds synthetic token ids: no tokenizer cases)
PROFILE_TAMPERED = [c for c in sorted(TAMPERED) if "tokenizer" not in c][::2]


@pytest.mark.parametrize("case", PROFILE_TAMPERED)
def test_tampered_bundle_refused(case, bundle, tmp_path, capfd):
    edit, fragment = TAMPERED[case]
    edit(bundle)
    refused(capfd, tmp_path, [bundle, "--sizes", "64", *FAST, "--csv", tmp_path / "r.csv"], fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["--repeat", "x"], "invalid int value"),
    (["--format", "xml"], "invalid choice"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_flags(argv, fragment, session_bundle, tmp_path, capfd):
    refused(capfd, tmp_path, [session_bundle, "--sizes", "64", *argv], fragment)


def test_not_a_bundle(tmp_path, capfd):
    refused(capfd, tmp_path, [tmp_path / "nope.litedge", "--sizes", "64"], "bundle")


def test_ctrl_c_while_measuring_is_interrupted_130(session_bundle, tmp_path, capfd, monkeypatch):
    from litedge.profile import measure

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(measure, "profile_bundle", interrupted)
    (tmp_path / "r.csv").write_text(OLD)
    before = snapshot(tmp_path)
    code, _, err = run(main, [session_bundle, "--sizes", "64", *FAST, "--csv", tmp_path / "r.csv"], capfd)
    assert_refused(code, err, status=130, prog="lit-profile")
    assert snapshot(tmp_path) == before


def test_ctrl_c_while_writing_a_report_leaves_no_temp(session_bundle, tmp_path, capfd, monkeypatch):
    from litedge.profile import report

    def interrupted(profiles):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "to_csv", interrupted)
    (tmp_path / "r.csv").write_text(OLD)
    before = snapshot(tmp_path)
    code, _, err = run(main, [session_bundle, "--sizes", "64", *FAST, "--csv", tmp_path / "r.csv"], capfd)
    assert_refused(code, err, status=130, prog="lit-profile")
    assert snapshot(tmp_path) == before
