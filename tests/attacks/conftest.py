"""Session-wide tiny models for the hostile cases: built once, copied per case when tampered with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.runtime.fixtures import export, make_tiny_pixart_pipeline


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    """tiny LiT student pipeline (linear attention, cheap VAE): lit-export's source."""
    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("attack-student") / "pipeline", linear=True,
                                     mid_attention=False)


@pytest.fixture(scope="session")
def session_bundle(student_dir, tmp_path_factory) -> Path:
    """Its fp32 cpu bundle (never modified: cases copy it)."""
    return export(student_dir, tmp_path_factory.mktemp("attack-bundle") / "lit.litedge")


@pytest.fixture
def bundle(session_bundle, tmp_path) -> Path:
    """A private copy of the bundle for one case, in its own work folder ``tmp_path``."""
    return Path(shutil.copytree(session_bundle, tmp_path / "b.litedge"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """tiny PixArt-Sigma softmax teacher pipeline: lit-distill's --teacher."""
    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("attack-teacher") / "pipeline")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """4 captioned 64 px shape images."""
    from tests.distill.fixtures import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("attack-data") / "shapes", count=4)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread (the machines are shared)."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _four_gib_available(monkeypatch):
    """The memory bound's messages do not depend on the machine: 4 GiB available (cases may override)."""
    try:
        from litedge.runtime import memory
    except ImportError:
        return
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * 2**30)
