"""Optional dependencies, checked before any work starts (torch-free).

Each command that needs an extra calls :func:`require` first, so a missing package is one
line naming what to install, never a ``ModuleNotFoundError`` half way through a run::

    require("lit-distill", DISTILL, "distill")
"""

from __future__ import annotations

import importlib.util

from litedge.errors import LitedgeError

EXPORT = ("torch", "onnx", "diffusers", "transformers", "safetensors")
DISTILL = ("torch", "diffusers", "transformers", "safetensors", "matplotlib")
PLOT = ("matplotlib",)


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
            found = False
        if not found:
            out.append(name)
    return out


def require(what: str, modules: tuple[str, ...], extra: str, install: str | None = None) -> None:
    """Raise LitedgeError naming ``pip install 'litedge[extra]'`` (or ``install``) when any of ``modules`` is missing."""
    absent = missing(modules)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise LitedgeError(f"{what} needs {', '.join(absent)}, which {verb} not installed: "
                           f"{install or f'pip install {chr(39)}litedge[{extra}]{chr(39)}'}")
