"""Session-wide tiny teacher pipeline and shapes dataset for the distillation tests."""

import pytest

from tests.distill.fixtures import make_shapes_dataset, make_tiny_pixart_pipeline


@pytest.fixture(scope="session")
def pixart_teacher(tmp_path_factory):
    """tiny PixArt-Sigma softmax teacher pipeline directory."""
    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("distill-teacher") / "pipeline")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """16 captioned 64x64 shape images."""
    return make_shapes_dataset(tmp_path_factory.mktemp("distill-data") / "shapes", count=16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and the machines are shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
