"""``python -m litedge``: the commands, or one of them run by name (``python -m litedge generate ...``)."""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), what it does); the console scripts are lit-<command>
COMMANDS = {
    "distill": ("litedge.cli.distill", "distill a linear student from a softmax teacher (torch)"),
    "export": ("litedge.cli.export", "export a model to a bundle for a device: cpu, cuda, directml, snapdragon, coreml"),
    "generate": ("litedge.cli.generate", "generate images from a bundle (torch-free)"),
    "profile": ("litedge.cli.profile", "latency per component, size and operator group (torch-free)"),
    "info": ("litedge.cli.info", "what a bundle holds: components, sizes, precision, fidelity, memory"),
}


def usage() -> str:
    from litedge import __version__

    rows = "\n".join(f"  {name:<9} lit-{name:<9} {what}" for name, (_, what) in COMMANDS.items())
    return (f"litedge {__version__}: linear diffusion transformers, from a PyTorch checkpoint to offline images\n\n"
            f"usage: python -m litedge COMMAND [ARGS...]   (the same as lit-COMMAND [ARGS...])\n\n"
            f"commands:\n{rows}\n\nlit-COMMAND --help shows each command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from litedge.cli import version_string

        print(version_string())
        return 0
    name = argv[0].removeprefix("lit-")
    if name not in COMMANDS:
        print(f"litedge: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
              "(python -m litedge --help)", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name][0]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
