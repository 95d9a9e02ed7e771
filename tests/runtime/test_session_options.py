"""ComponentSession: deliberate session options, IO binding (through the CPU EP's binding API),
and the optimized-graph cache; each run must give the plain session's output."""

import numpy as np
import onnxruntime as ort
import pytest

from litedge.bundle import verify_bundle
from litedge.errors import LitedgeError
from litedge.profile.inputs import synthetic_feed
from litedge.runtime.devices import DEVICES
from litedge.runtime.session import ComponentSession, cpu_threads, optimized_graph_path, session_options

CPU = DEVICES["cpu"]


def _transformer(bundle, **kw):
    manifest = verify_bundle(bundle)
    component = manifest.components["transformer"]
    feed = synthetic_feed(component, {"batch": 2, "height": 8, "width": 8, "text_length": 8})
    return ComponentSession.open(bundle, "transformer", component, CPU, **kw), component, feed


def test_options_are_set_on_purpose(monkeypatch):
    options = session_options(CPU)
    assert options.intra_op_num_threads == cpu_threads() >= 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena and not session_options(CPU, low_memory=True).enable_cpu_mem_arena
    monkeypatch.setenv("LITEDGE_THREADS", "3")
    assert session_options(CPU).intra_op_num_threads == 3
    monkeypatch.setenv("LITEDGE_THREADS", "many")
    with pytest.raises(LitedgeError, match="LITEDGE_THREADS"):
        cpu_threads()


def test_io_binding_gives_the_plain_output_and_uploads_unchanged_inputs_once(lit_bundle):
    plain, _, feed = _transformer(lit_bundle)
    bound, _, _ = _transformer(lit_bundle, io_binding=True)
    assert not plain.io_binding and bound.io_binding  # CPU EP: off unless asked; CUDA: on (below)
    ref = plain.run(**feed)
    np.testing.assert_array_equal(bound.run(**feed), ref)
    assert bound.uploads == len(feed)
    # A denoising loop: new latents and timestep each step, the same prompt embeddings and mask.
    step = {**feed, "sample": feed["sample"] * 0.5, "timestep": feed["timestep"] - 100}
    np.testing.assert_array_equal(bound.run(**step), plain.run(**step))
    assert bound.uploads == len(feed) + 2
    bound.close()


def test_cuda_sessions_bind_by_default():
    from litedge.runtime.session import IO_BINDING_PROVIDERS, ORT_DEVICE

    assert DEVICES["cuda"].provider in IO_BINDING_PROVIDERS and ORT_DEVICE[DEVICES["cuda"].provider] == "cuda"
    assert CPU.provider not in IO_BINDING_PROVIDERS


def test_optimized_graph_cache_is_written_once_and_reused(lit_bundle, tmp_path, monkeypatch):
    plain, component, feed = _transformer(lit_bundle)
    ref = plain.run(**feed)
    assert optimized_graph_path(component, CPU) is None  # opt-in
    monkeypatch.setenv("LITEDGE_ORT_CACHE", str(tmp_path / "cache"))
    cached = optimized_graph_path(component, CPU)
    first, _, _ = _transformer(lit_bundle)
    assert cached.is_file()
    second, _, _ = _transformer(lit_bundle)
    for session in (first, second):
        np.testing.assert_allclose(session.run(**feed), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
