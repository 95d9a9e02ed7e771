"""Thin command-line shells: parse arguments into a typed config, call the library.

Every command turns a :class:`litedge.errors.LitedgeError` into one line on stderr and
exit status 2; Ctrl-C exits with 130 and leaves no partial output (the library writes
to temporary paths and renames).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from litedge.errors import LitedgeError


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` with litedge's error convention: one line for user errors, no traceback."""
    try:
        return body()
    except LitedgeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
