"""Session-wide tiny bundles for the runtime tests (built once, by tests/runtime/fixtures.py)."""

import pytest

from tests.runtime.fixtures import export, make_tiny_pixart_pipeline


@pytest.fixture(scope="session")
def pixart_pipeline_dir(tmp_path_factory):
    """tiny PixArt-Sigma (softmax teacher) diffusers pipeline directory."""
    return make_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipeline")


@pytest.fixture(scope="session")
def pixart_bundle(pixart_pipeline_dir, tmp_path_factory):
    """Its fp32 cpu bundle."""
    return export(pixart_pipeline_dir, tmp_path_factory.mktemp("bundles") / "pixart.litedge")


@pytest.fixture(scope="session")
def lit_bundle(tmp_path_factory):
    """tiny LiT student (linear attention) with a VAE without mid-block attention: cheap at 2048 px."""
    root = tmp_path_factory.mktemp("lit")
    pipeline = make_tiny_pixart_pipeline(root / "pipeline", linear=True, mid_attention=False)
    return export(pipeline, root / "lit.litedge")


@pytest.fixture(scope="session")
def dit_pipeline_dir(tmp_path_factory):
    from tests.runtime.fixtures import make_tiny_dit_pipeline

    return make_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipeline")


@pytest.fixture(scope="session")
def dit_bundle(dit_pipeline_dir, tmp_path_factory):
    return export(dit_pipeline_dir, tmp_path_factory.mktemp("dit-bundle") / "dit.litedge")


@pytest.fixture(scope="session")
def sd3_pipeline_dir(tmp_path_factory):
    """tiny SD3 (softmax MM-DiT teacher) diffusers pipeline directory: CLIP-L, CLIP-G and T5."""
    from tests.runtime.fixtures import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


@pytest.fixture(scope="session")
def sd3_bundle(sd3_pipeline_dir, tmp_path_factory):
    from tests.runtime.fixtures import export_sd3

    return export_sd3(sd3_pipeline_dir, tmp_path_factory.mktemp("sd3-bundle") / "sd3.litedge")


@pytest.fixture(scope="session")
def mmedit_pipeline_dir(tmp_path_factory):
    """its MM-EDiT student, without T5 (diffusers then feeds zeros for T5's features)."""
    from tests.runtime.fixtures import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("mmedit") / "pipeline", linear=True, t5=False)


@pytest.fixture(scope="session")
def mmedit_bundle(mmedit_pipeline_dir, tmp_path_factory):
    from tests.runtime.fixtures import export_sd3

    return export_sd3(mmedit_pipeline_dir, tmp_path_factory.mktemp("mmedit-bundle") / "mmedit.litedge")
