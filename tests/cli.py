"""Calling a command's ``main(argv)`` in process, as the tests of every verb do."""

from typing import Callable, Sequence


def run_main(main: Callable[[list[str]], int], argv: Sequence[object], capsys) -> tuple[int, str, str]:
    """Run ``main`` on ``argv`` (each item str()-ed); returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
