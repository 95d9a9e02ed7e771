"""Thin command-line shells: parse arguments into a typed config, call the library.

Every command turns a :class:`litedge.errors.LitedgeError` into one line on stderr and
exit status 2; Ctrl-C exits with 130 and leaves no partial output (the library writes
to temporary paths and renames).

Every command shares :func:`add_common_args` (``-q/--quiet``, ``-v/--verbose``,
``--version``) and :func:`command_logging`: litedge's messages (the ``litedge`` logger tree:
``litedge.export``, ``litedge.distill``, ``litedge.runtime``, ...) go to stderr as
``PROG: message`` lines, INFO and up by default, WARNING and up with ``-q``, DEBUG with
``-v``. Third-party progress bars, log lines and Python warnings (diffusers' and
transformers' loading bars, torch's tracer warnings) are kept off the terminal unless ``-v``.
This module imports neither torch nor diffusers: a torch-free command stays torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence

from litedge import __version__
from litedge.errors import LitedgeError

LOGGER = "litedge"
# Libraries whose logging and progress bars a torch-side command quiets (unless -v).
THIRD_PARTY = ("diffusers", "transformers")


class HelpFormatter(argparse.HelpFormatter):
    """--help with each option's default as ``(default: X)``.

    Left out where it says nothing: flags (default False), options whose default is None
    (their help says what is used instead) and help that already names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == [] or "default" in help
                or not action.option_strings
                or isinstance(action, (argparse._VersionAction, argparse._HelpAction))):
            return help
        shown = ",".join(str(d) for d in default) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{help} (default: {shown})"


def version_string() -> str:
    """What ``--version`` prints: ``litedge X.Y.Z``."""
    return f"litedge {__version__}"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``-q/--quiet``, ``-v/--verbose`` and ``--version`` to ``parser``; returns it.

    An option the command already defines (e.g. its own ``--quiet``) is left as it is. A
    parser with argparse's default formatter gets :class:`HelpFormatter` (defaults shown).
    """
    taken = set(parser._option_string_actions)  # argparse has no public lookup
    if parser.formatter_class is argparse.HelpFormatter:  # argparse's default: show defaults too
        parser.formatter_class = HelpFormatter
    group = parser.add_argument_group("output")
    if not taken & {"-q", "--quiet"}:
        group.add_argument("-q", "--quiet", action="store_true",
                           help="only warnings and errors on stderr; no progress bars")
    if not taken & {"-v", "--verbose"}:
        group.add_argument("-v", "--verbose", action="store_true",
                           help="debug messages, and third-party progress bars and warnings")
    if "--version" not in taken:
        group.add_argument("--version", action="version", version=version_string(),
                           help="print the litedge version and exit")
    one_line_errors(parser)  # argparse errors as one stderr line (issue 17)
    return parser


class _Formatter(logging.Formatter):
    """``PROG: message`` for INFO, ``PROG: warning: message`` for the other levels."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.prog}: {level}{record.getMessage()}"
        if record.exc_info and record.levelno <= logging.DEBUG:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (redirections and test capture work)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_level(args: argparse.Namespace) -> int:
    """The litedge logger's level for parsed ``args``: WARNING (-q), DEBUG (-v) or INFO."""
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else logging.INFO


@contextlib.contextmanager
def _library_output(name: str, quiet: bool) -> Iterator[None]:
    """One library's own logging and progress bars: errors only and no bars (``quiet``), or
    warnings and bars (``-v``). Imported here, so used by torch-side commands only; restored on exit."""
    try:
        module = importlib.import_module(f"{name}.utils.logging")
    except ImportError:
        yield
        return
    verbosity, bars = module.get_verbosity(), module.is_progress_bar_enabled()
    if quiet:
        module.set_verbosity_error()
        module.disable_progress_bar()
    else:
        module.set_verbosity(min(verbosity, logging.WARNING))
        module.enable_progress_bar()
    try:
        yield
    finally:
        module.set_verbosity(verbosity)
        (module.enable_progress_bar if bars else module.disable_progress_bar)()


@contextlib.contextmanager
def command_logging(prog: str, args: argparse.Namespace, third_party: Sequence[str] = ()) -> Iterator[logging.Logger]:
    """Configure logging for one command run; everything is restored on exit.

    Args:
        prog: the prefix of each stderr line, e.g. "lit-export".
        args: parsed arguments with ``quiet`` / ``verbose`` (see :func:`add_common_args`).
        third_party: libraries to quiet unless ``-v`` (imported here, so only for commands
            that use them anyway, e.g. :data:`THIRD_PARTY` for lit-export and lit-distill).
    """
    logger = logging.getLogger(LOGGER)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(prog))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(log_level(args))
    logger.propagate = False  # one line per message, even when the root logger has handlers
    verbose = getattr(args, "verbose", False)
    logger.debug(f"{version_string()} (python {sys.version.split()[0]}); arguments: {vars(args)}")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            if not verbose:
                warnings.simplefilter("ignore")
            for name in third_party:
                stack.enter_context(_library_output(name, quiet=not verbose))
            yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def run_command(prog: str, body: Callable[[], int], args: argparse.Namespace | None = None,
                third_party: Sequence[str] = ()) -> int:
    """Run ``body`` with litedge's error convention: one line for user errors, no traceback.

    With ``args`` (parsed with :func:`add_common_args`), ``body`` runs inside
    :func:`command_logging`. Errors are printed directly, so ``-q`` never hides them.
    """
    try:
        if args is None:
            return body()
        with command_logging(prog, args, third_party):
            return body()
    except LitedgeError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # what the machine refuses is one line too (issue 17)
        print(f"{prog}: error: out of memory; try a smaller size or batch, or close other programs", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, EIO, a read-only folder: the environment, not a bug
        if exc.errno is None:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc} (the system refused an operation); nothing was "
              "left half-written; free space, fix permissions or choose other paths, then retry", file=sys.stderr)
        return 2


def one_line(text: str) -> str:
    """``text`` with its line breaks replaced by spaces, so an error is always one stderr line."""
    return " ".join(text.replace("\r", "\n").split("\n"))


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser``'s errors one stderr line (exit 2: ``PROG: error: MESSAGE (see PROG --help)``)
    instead of the usage text plus the error."""
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {one_line(message)} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with :func:`one_line_errors`."""
    return one_line_errors(parser).parse_args(argv)
