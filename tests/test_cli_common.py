"""What every command shares (litedge.cli): --version, -q/-v, logging, third-party quiet, --help defaults."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import warnings

import pytest

import litedge
from litedge.cli import THIRD_PARTY, add_common_args, command_logging, run_command

COMMANDS = {
    "lit-export": "litedge.cli.export",
    "lit-generate": "litedge.cli.generate",
    "lit-profile": "litedge.cli.profile",
    "lit-distill": "litedge.cli.distill",
    "lit-info": "litedge.cli.info",
}


def _command(name: str):
    module = COMMANDS[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet ({name} is being added by another change)")
    return importlib.import_module(module)


@pytest.mark.parametrize("name", COMMANDS)
def test_version(name, capsys):
    with pytest.raises(SystemExit) as done:
        _command(name).main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"litedge {litedge.__version__}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_shows_its_default(name):
    parser = _command(name).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"{name} {action.option_strings}: default {action.default!r} not shown"
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"-q", "--quiet", "-v", "--verbose", "--version"} <= options


def test_distill_help_states_the_training_defaults():
    text = " ".join(_command("lit-distill").build_parser().format_help().split())  # unwrapped
    for shown in ("(default: 1000)", "(default: 4)", "(default: 0.0001)", "(default: 0.9999)", "(default: 500)"):
        assert shown in text


def _run(argv: list[str], third_party=()) -> int:
    """A command body that reports at each level through the litedge tree, as the library does."""
    parser = add_common_args(argparse.ArgumentParser(prog="lit-test"))
    args = parser.parse_args(argv)

    def body() -> int:
        logging.getLogger("litedge.export").info("stage one")
        logging.getLogger("litedge.distill").debug("detail")
        logging.getLogger("litedge.runtime").warning("careful")
        return 0

    return run_command("lit-test", body, args, third_party)


@pytest.mark.parametrize(
    "argv, shown, hidden",
    [
        ([], ["lit-test: stage one", "lit-test: warning: careful"], ["detail"]),
        (["-q"], ["lit-test: warning: careful"], ["stage one", "detail"]),
        (["-v"], ["lit-test: stage one", "lit-test: debug: detail", "lit-test: warning: careful",
                  "lit-test: debug: litedge " + litedge.__version__], []),
    ],
)
def test_levels(argv, shown, hidden, capsys):
    assert _run(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    for line in shown:
        assert line in captured.err
    for text in hidden:
        assert text not in captured.err
    assert all(line.startswith("lit-test: ") for line in captured.err.splitlines())


def test_errors_are_one_line_even_with_quiet(capsys):
    args = add_common_args(argparse.ArgumentParser(prog="lit-test")).parse_args(["-q"])

    def body() -> int:
        raise litedge.LitedgeError("bad input: expected X, got Y")

    assert run_command("lit-test", body, args) == 2
    assert capsys.readouterr().err == "lit-test: error: bad input: expected X, got Y\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_third_party_bars_logs_and_warnings_only_with_verbose():
    """diffusers' / transformers' log lines and bars and Python warnings: hidden, unless -v.

    The libraries' own stderr handlers hold whatever stderr was when they were imported, so
    what passes their loggers' levels is collected by a handler of the test's own.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = {"diffusers": diffusers_logging, "transformers": transformers_logging}
    before = {name: (lib.get_verbosity(), lib.is_progress_bar_enabled()) for name, lib in libraries.items()}
    for argv in ([], ["-v"]):
        verbose = bool(argv)
        args = add_common_args(argparse.ArgumentParser(prog="lit-test")).parse_args(argv)
        records = _Records()
        for name in libraries:
            logging.getLogger(name).addHandler(records)
        try:
            with warnings.catch_warnings(record=True) as caught:  # what reaches warnings.showwarning
                warnings.simplefilter("always")
                with command_logging("lit-test", args, THIRD_PARTY):
                    bars = {name: lib.is_progress_bar_enabled() for name, lib in libraries.items()}
                    for name, lib in libraries.items():
                        lib.get_logger(f"{name}.models").warning(f"{name} says hello")
                    warnings.warn("torch says hello", UserWarning)
        finally:
            for name in libraries:
                logging.getLogger(name).removeHandler(records)
        assert bars == {"diffusers": verbose, "transformers": verbose}
        assert records.messages == (["diffusers says hello", "transformers says hello"] if verbose else [])
        assert [str(w.message) for w in caught] == (["torch says hello"] if verbose else [])
    after = {name: (lib.get_verbosity(), lib.is_progress_bar_enabled()) for name, lib in libraries.items()}
    assert after == before  # restored: a command run in-process leaves the caller's settings alone


def test_export_stage_lines_follow_quiet(tmp_path, capsys):
    """lit-export's progress lines are litedge.export INFO records: shown by default, gone with -q."""
    from litedge.models.configs import build_model
    from litedge.models.student import save_transformer

    main = _command("lit-export").main
    save_transformer(build_model("tiny-LiT-S/2", seed=0), tmp_path / "student")  # a lone transformer: quick
    base = [str(tmp_path / "student"), "--weights", "fp"]
    assert main([*base, "-o", str(tmp_path / "a.litedge")]) == 0
    loud = capsys.readouterr()
    assert main([*base, "-q", "-o", str(tmp_path / "b.litedge")]) == 0
    quiet = capsys.readouterr()
    assert "lit-export: transformer" in loud.err
    assert "lit-export:" not in quiet.err and "Loading" not in quiet.err
    assert loud.out.strip().splitlines()[-1] == str(tmp_path / "a.litedge")  # the result stays on stdout
    assert quiet.out.strip().splitlines()[-1] == str(tmp_path / "b.litedge")


def test_no_source_file_refers_outside_the_repository():
    """The design document lives in the repository (docs/design.md): nothing cites ../shared or DESIGN.md."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("src", "tests", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            for needle in ("../shared", "shared/DESIGN", "DESIGN.md"):
                if needle in text and path != Path(__file__).resolve():
                    offenders.append(f"{path.relative_to(root)}: {needle}")
    readme = (root / "README.md").read_text()
    offenders += [f"README.md: {n}" for n in ("../shared", "DESIGN.md") if n in readme]
    assert not offenders, offenders
    assert (root / "docs" / "design.md").is_file()
