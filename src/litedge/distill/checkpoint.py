"""Training checkpoints, written so that a process killed at any moment never leaves one that loads wrong.

Layout of ``RUN_DIR/checkpoints/``::

    step-000050/
        transformer/    the student, exactly as ``save_transformer`` writes it (lit-export reads it)
        ema/            the EMA student, same format
        optimizer.pt    AdamW state (tensors and numbers only: loaded with weights_only=True)
        state.json      step, the run's config, RNG states (as lists of ints)
    latest              the name of the newest complete checkpoint ("step-000050")

A checkpoint is assembled in a hidden temporary directory, every file is fsync'ed, and the
directory is renamed into place; only then is ``latest`` replaced (``os.replace``). A
``step-*`` directory therefore exists only when complete, and ``latest`` never names a
partial one. Resuming reads ``latest`` and falls back to the newest ``step-*`` directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from litedge.atomic import make_temp_dir, recover_interrupted, replace_dir
from litedge.distill.guards import check_finite_weights
from litedge.errors import LitedgeError
from litedge.models.student import load_state_dict_checked, read_safetensors_weights, save_transformer
from litedge.safe_write import write_text

LATEST = "latest"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        if path.is_dir() and os.name == "nt":  # directories cannot be opened for fsync on Windows
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """torch's CPU (and CUDA) RNG states as lists of ints, JSON-safe."""
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    run_dir: Path, step: int, student: nn.Module, ema: nn.Module | None,
    optimizer: torch.optim.Optimizer, state: dict,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically and point ``latest`` at it; returns its path."""
    check_finite_weights(student, f"checkpoint step {step}")  # a diverged run publishes nothing
    if ema is not None:
        check_finite_weights(ema, f"checkpoint step {step} (EMA)")
    root = Path(run_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover_interrupted(final)
        tmp = make_temp_dir(final)  # .step-NNNNNN.tmp-<pid>-<random>: the next run can tell it is stale
    except OSError as e:
        raise LitedgeError(f"cannot write checkpoints in {root} ({e.strerror}); free space or fix the folder") from None
    try:
        save_transformer(student, tmp / "transformer")
        if ema is not None:
            save_transformer(ema, tmp / "ema")
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({**state, "step": step, "rng": rng_state()}))
        _fsync_tree(tmp)
        replace_dir(tmp, final)  # a re-save of the same step (a resumed run that went back) replaces it
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LitedgeError(f"cannot write checkpoint {final} ({e.strerror}); the previous checkpoints are "
                           "unchanged; free space or fix the folder and rerun with --resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(root / LATEST, final.name, what="checkpoint pointer")  # litedge.safe_write: temp, fsync, rename
    return final


def _complete(path: Path) -> bool:
    return (path / STATE).is_file() and (path / "transformer").is_dir() and (path / OPTIMIZER).is_file()


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.parent == root and named.name.startswith("step-") and _complete(named):
            return named
    candidates = sorted((p for p in root.glob("step-*") if _complete(p)), reverse=True) if root.is_dir() else []
    return candidates[0] if candidates else None


def load_checkpoint(
    path: Path, student: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer | None,
    *, restore_rng: bool = True,
) -> dict:
    """Load weights, optimizer and RNG states from a checkpoint into the given objects; returns state.json."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise LitedgeError(f"{path / STATE}: unreadable checkpoint state ({exc}); delete {path.name} to resume from an older one") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("config"), dict):
        raise LitedgeError(f"{path / STATE}: not a checkpoint state (no step or config); delete {path.name} "
                           "to resume from an older one")
    try:
        load_state_dict_checked(student, read_safetensors_weights(path / "transformer"), str(path / "transformer"))
        if ema is not None:
            source = path / "ema" if (path / "ema").is_dir() else path / "transformer"
            load_state_dict_checked(ema, read_safetensors_weights(source), str(source))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
        if restore_rng:
            set_rng_state(state["rng"])
    except LitedgeError:
        raise
    except Exception as exc:  # noqa: BLE001  safetensors, torch.load (weights_only) and RNG errors on damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LitedgeError(f"{path}: damaged checkpoint ({type(exc).__name__}: {first}); delete {path.name} to "
                           "resume from an older one") from None
    return state
