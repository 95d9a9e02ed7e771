"""lit-export --target snapdragon: QDQ -> QNN HTP EPContext, run on the x86 HTP simulator.

Needs onnxruntime-qnn (the plug-in EP with the HTP simulator, Linux x86_64); skipped without it.
Figures on the tiny LiT student (randomized weights), 64 px (8x8 latent), text 300, sm8650:
w8a16 rel err 1.6e-2 on the held-out check (QDQ graph on CPU: 1.7e-2; up to 0.12 on fresh
random text embeddings), w4a16 0.16;
EPContext compile ~2 s, the whole export ~17 s.
"""

import json

import numpy as np
import onnx
import pytest
import torch

from litedge.bundle import verify_bundle
from litedge.cli.export import main
from litedge.errors import LitedgeError
from litedge.models.configs import build_model
from litedge.models.student import save_transformer
from tests.models.test_linearize import randomize

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (QNN HTP plug-in EP) is not installed: pip install 'litedge[qnn]'")

from litedge.export import qai_hub as hub_module  # noqa: E402
from litedge.export.calibration import denoising_calibration  # noqa: E402
from litedge.export.qnn_ep import SOCS, simulator_session  # noqa: E402
from litedge.export.specs import transformer_wrapper  # noqa: E402

TOKEN_LINE = ("lit-export: error: --hub needs a Qualcomm AI Hub token: run `qai-hub configure --api_token TOKEN` "
              "(https://aihub.qualcomm.com), or drop --hub")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    model = randomize(build_model("tiny-LiT-T2I-XL"), seed=2)
    path = tmp_path_factory.mktemp("student") / "student"
    save_transformer(model, path)
    return model, path


def _export(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_bundle(model, out, weights, bound):
    manifest = verify_bundle(out)
    comp = manifest.components["transformer"]
    meta = comp.meta
    assert comp.file == "transformer_64x64.onnx" and comp.shapes == [[64, 64]]
    assert meta["buckets"] == {"64x64": "transformer_64x64.onnx"}
    assert [e["file"] for e in comp.extra_files] == ["transformer_64x64_qnn.bin"]
    assert meta["qnn"]["soc_model"] == SOCS["sm8650"].soc_model and meta["qnn"]["htp_arch"] == 75
    assert meta["qnn"]["backend"] == "htp" and meta["batch"] == 2 and meta["text_length"] == 300
    assert meta["weights"] == weights and meta["quantization"]["activations"] == "uint16"
    assert {n.op_type for n in onnx.load(str(out / comp.file)).graph.node} == {"EPContext"}  # all on HTP

    # The bundle's EPContext graph loads with CPU fallback disabled and runs on the simulator.
    session = simulator_session(out / comp.file, SOCS["sm8650"])
    wrapper = transformer_wrapper(model)
    feed = denoising_calibration(wrapper, (8, 8), text_length=300, steps=3, trajectories=1, seed=7)[1]
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(feed[n]) for n in wrapper.spec().input_names)).numpy()
    got = session.run(None, feed)[0]
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert 0 < rel < bound
    assert 0 < manifest.fidelity["transformer"]["rel_err"] < bound
    return manifest, rel


def test_int8_bucket_compiles_to_epcontext_and_runs_on_htp_simulator(student, tmp_path, capsys):
    model, path = student
    out = tmp_path / "m.litedge"
    code, stdout, err = _export([path, "--target", "snapdragon", "--weights", "int8", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    # measured: 1.6e-2 on the held-out check; 0.7e-2..1.2e-1 over 20 fresh random-conditioning inputs
    _check_bundle(model, out, "int8", bound=0.15)
    assert "QNN HTP simulator" in stdout and "HTP simulator (x86) vs PyTorch fp32" in err


@pytest.mark.slow
def test_int4_default_weights_are_looser_but_bounded(student, tmp_path, capsys):
    model, path = student
    out = tmp_path / "m.litedge"
    code, _, err = _export([path, "--target", "snapdragon", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    manifest, _ = _check_bundle(model, out, "int4", bound=0.3)  # measured 0.16: random weights, plain int4
    assert manifest.components["transformer"].meta["quantization"]["weight_dtype"].startswith("int4")


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "lit-export: error: --target snapdragon compiles one static graph per image size: give --sizes"),
        (["--sizes", "64", "--soc", "sm9999"], "lit-export: error: unknown --soc 'sm9999': choose one of sm8350"),
    ],
)
def test_bad_options_fail_in_one_line_before_export(student, tmp_path, capsys, extra, message):
    out = tmp_path / "m.litedge"
    code, _, err = _export([student[1], "--target", "snapdragon", "-o", out, *extra], capsys)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_hub_without_token_is_one_line_and_no_bundle(student, tmp_path, capsys, monkeypatch):
    pytest.importorskip("qai_hub", reason="qai-hub is not installed: pip install 'litedge[hub]'")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "no-such-client.ini"))
    out = tmp_path / "m.litedge"
    code, _, err = _export([student[1], "--target", "snapdragon", "--sizes", "64", "--hub", "Samsung Galaxy S24 (Family)",
                            "-o", out], capsys)
    assert code == 2
    assert err == TOKEN_LINE + "\n"
    assert not out.exists() and not list(tmp_path.glob(".m.litedge*"))


# ----------------------------------------------------------------------------- AI Hub, faked network


class FakeJob:
    def __init__(self, kind, n, target=None, profile=None):
        self.job_id, self.url = f"j{kind}{n}", f"https://aihub.example/jobs/j{kind}{n}"
        self._target, self._profile = target, profile

    def get_target_model(self):
        return self._target

    def download_profile(self):
        return self._profile


class FakeClient:
    """Stands in for the ``qai_hub`` module: records what would be submitted."""

    class UserError(Exception):
        pass

    def __init__(self, token=True):
        self.token, self.compiled, self.profiled = token, [], []

    def get_devices(self, name=""):
        if not self.token:
            raise self.UserError("client.ini not found")
        return [name] if name.startswith("Samsung") else []

    def Device(self, name):  # noqa: N802 (qai_hub's name)
        return ("device", name)

    def submit_compile_job(self, model, device, name=None, options=""):
        nodes = {n.op_type for n in onnx.load(model).graph.node}  # the file exists while submitted
        self.compiled.append({"model": model, "device": device, "name": name, "options": options, "ops": nodes})
        return FakeJob("c", len(self.compiled), target=f"target-model-{len(self.compiled)}")

    def submit_profile_job(self, model, device, name=None, options=""):
        self.profiled.append({"model": model, "device": device, "name": name})
        summary = {"estimated_inference_time": 1234, "estimated_inference_peak_memory": 5678}
        return FakeJob("p", len(self.profiled), profile={"execution_summary": summary})


def test_ai_hub_wrapper_submits_compile_then_profile(tmp_path):
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(tmp_path / "m.onnx"))
    client = FakeClient()
    hub = hub_module.AIHub.connect_to("Samsung Galaxy S24 (Family)", client=client)
    entry = hub.compile_and_profile(tmp_path / "m.onnx", name="litedge transformer 64x64")
    assert client.compiled[0]["device"] == ("device", "Samsung Galaxy S24 (Family)")
    assert client.compiled[0]["options"] == "--target_runtime precompiled_qnn_onnx"
    assert client.profiled == [{"model": "target-model-1", "device": ("device", "Samsung Galaxy S24 (Family)"),
                                "name": "litedge transformer 64x64"}]
    assert entry["compile_job"] == "jc1" and entry["profile_job"] == "jp1" and entry["status"] == "profiled"
    assert entry["estimated_inference_time_us"] == 1234 and entry["peak_memory_bytes"] == 5678

    with pytest.raises(hub_module.LitedgeError, match="no such AI Hub device"):
        hub_module.AIHub.connect_to("Pixel 9", client=client)
    with pytest.raises(hub_module.LitedgeError) as info:
        hub_module.AIHub.connect_to("Samsung Galaxy S24 (Family)", client=FakeClient(token=False))
    assert str(info.value) == hub_module.TOKEN_HELP


@pytest.mark.slow
def test_hub_export_submits_each_bucket_and_reports_jobs(student, tmp_path, capsys, monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(hub_module, "connect", lambda: client)
    out = tmp_path / "m.litedge"
    code, _, err = _export([student[1], "--target", "snapdragon", "--weights", "int8", "--sizes", "64",
                            "--soc", "sm8750", "--hub", "Samsung Galaxy S25 (Family)", "-o", out], capsys)
    assert code == 0, err
    [compiled] = client.compiled
    assert compiled["device"] == ("device", "Samsung Galaxy S25 (Family)")
    assert compiled["model"].endswith("64x64.qdq.onnx") and {"QuantizeLinear", "DequantizeLinear"} <= compiled["ops"]
    assert compiled["options"] == "--target_runtime precompiled_qnn_onnx"
    meta = json.loads((out / "manifest.json").read_text())["components"]["transformer"]["meta"]
    assert meta["qnn"]["soc_model"] == 69 and meta["qnn"]["htp_arch"] == 79
    [entry] = meta["ai_hub"]
    assert entry["bucket"] == "64x64" and entry["compile_job"] == "jc1" and entry["estimated_inference_time_us"] == 1234
    assert "AI Hub profiled, estimated 1234 us" in err


# ----------------------------------------------------------------------------- large graphs (external data)


def _external(path):
    """(graph file, [external data files]) of an ONNX model, and whether its weights are all external."""
    from onnx.external_data_helper import uses_external_data

    from litedge.export.onnx_io import model_files

    model = onnx.load(str(path), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_type and np.prod(t.dims) * 4 >= 4096]
    return model_files(path)[1:], bool(big) and all(uses_external_data(t) for t in big)


@pytest.mark.parametrize("simulate", [True, False], ids=["simulated", "simulator-too-slow"])
def test_large_graph_keeps_external_data_through_every_step_and_runs(student, tmp_path, capsys, monkeypatch, simulate):
    """A graph past the external-data threshold (lowered here: the tiny model's 0.4 MB count as
    "over 2 GB") is folded, decomposed, quantized and compiled from external data at every step.
    Where the simulator would take too long (the budget set to 0 here, hours at full size), the
    context is loaded on it and the QDQ graph's CPU run gives the figures."""
    import onnxruntime.quantization as ortq

    from litedge.export import onnx_io, qnn_backend

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    if not simulate:
        monkeypatch.setattr(qnn_backend, "SIMULATOR_BUDGET_S", 0.0)
    seen = {}

    def fold(src, dst, fold=qnn_backend.fold_constants):
        seen["fp32"] = _external(src)
        files = fold(src, dst)
        seen["folded"] = _external(dst)
        return files

    def quantize(src, dst, reader, quantize=ortq.quantize_static, **kwargs):
        seen["prepared"] = _external(src)
        seen["opset"] = next(o.version for o in onnx.load(src, load_external_data=False).opset_import if o.domain == "")
        quantize(src, dst, reader, **kwargs)
        seen["qdq"] = _external(dst)

    def compile_context(qdq, out, soc, compile_context=qnn_backend.compile_context):
        seen["compiled_from"] = _external(qdq)
        return compile_context(qdq, out, soc)

    monkeypatch.setattr(qnn_backend, "fold_constants", fold)
    monkeypatch.setattr(ortq, "quantize_static", quantize)
    monkeypatch.setattr(qnn_backend, "compile_context", compile_context)
    model, path = student
    out = tmp_path / "m.litedge"
    code, _, err = _export([path, "--target", "snapdragon", "--weights", "int8", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    for step in ("fp32", "folded", "prepared", "qdq", "compiled_from"):
        data, all_external = seen[step]
        assert len(data) == 1 and data[0].name.endswith(".onnx.data") and all_external, step
    assert seen["opset"] == 21  # lifted before the quantizer, which would serialize the whole model to do it
    manifest, _ = _check_bundle(model, out, "int8", bound=0.3)  # 4 calibration samples, one check input
    meta = manifest.components["transformer"].meta
    assert meta["quantization"]["calibration"]["plan"] == {"64x64": "large"}
    bucket = meta["fidelity"]["buckets"]["64x64"]
    assert meta["quantization"]["calibration"]["steps"] == 3 and bucket["steps"] == 1
    assert "on 1 held-out input(s)" in err
    if simulate:
        assert bucket["on"] == "qnn-htp-simulator-x86" and bucket["simulator_s"] > 0
        assert "skipped" in manifest.fidelity["transformer_qdq_cpu"]
    else:
        assert bucket["on"] == "qdq-cpu-ep" and bucket["simulator"]["ran"] is False and bucket["cpu_s"] > 0
        assert bucket["rel_err"] == manifest.fidelity["transformer_qdq_cpu"]["rel_err"]
        assert "the EPContext loads on the HTP simulator, not run there" in err
    assert not list(tmp_path.glob("**/*.onnx.data"))  # the bundle holds the EPContext graph + QNN binary only


def test_samples_plan_outputs_equal_a_second_pytorch_pass(student):
    """denoising_samples' outputs are the model's own (no second pass needed) and start at first_step."""
    from litedge.export.calibration import denoising_samples

    model, _ = student
    wrapper = transformer_wrapper(model)
    full = denoising_calibration(wrapper, (8, 8), text_length=300, steps=3, trajectories=1, seed=5)
    feeds, outputs = denoising_samples(wrapper, (8, 8), text_length=300, steps=3, seed=5, first_step=1)
    assert len(feeds) == len(outputs) == 2
    for feed, ref_feed, out in zip(feeds, full[1:], outputs):
        assert all(np.array_equal(feed[k], ref_feed[k]) for k in feed)
        with torch.no_grad():
            ref = wrapper(*(torch.from_numpy(feed[n]) for n in wrapper.spec().input_names)).numpy()
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_minmax_ranges_equal_onnxruntimes_own_calibration(student, tmp_path):
    """The bounded-memory calibration (priority-based order, weights dropped) gives onnxruntime's ranges."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from litedge.export.calibration import FeedReader, minmax_ranges
    from litedge.export.onnx_export import export_transformer
    from litedge.export.qnn_ep import fold_constants

    model, _ = student
    result = export_transformer(model, tmp_path / "fp32.onnx", dynamic=False, sample_size=(8, 8), text_length=300)
    fold_constants(result.path, tmp_path / "folded.onnx")
    feeds = denoising_calibration(transformer_wrapper(model), (8, 8), text_length=300, steps=3, trajectories=1)
    config = get_qnn_qdq_config(str(tmp_path / "folded.onnx"), None, activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QUInt8, per_channel=True)
    ours = load_tensors_data(minmax_ranges(tmp_path / "folded.onnx", feeds, tmp_path / "cache.json",
                                           op_types=config.op_types_to_quantize, external_data=True))
    calibrator = create_calibrator(tmp_path / "folded.onnx", config.op_types_to_quantize,
                                   augmented_model_path=str(tmp_path / "augmented.onnx"))
    calibrator.collect_data(FeedReader(feeds))
    theirs = calibrator.compute_data()
    assert set(ours.data) == set(theirs.data) and len(ours.data) > 50
    for name, rng in theirs.data.items():
        np.testing.assert_array_equal(ours.data[name].range_value, rng.range_value, err_msg=name)
    assert not list(tmp_path.glob(".calibration-*"))  # its work folder is gone


# ----------------------------------------------------------------------------- compile in parts


def test_large_graph_compiles_as_one_context_per_block_range_and_equals_the_whole(student, tmp_path, capsys,
                                                                                  monkeypatch):
    """A large graph (threshold lowered) with more blocks than BLOCKS_PER_PART (lowered to 1: the
    tiny model's 2 blocks -> 2 parts) is compiled part by part in child processes and joined in one
    EPContext graph of 2 EPContext nodes, 2 QNN binaries. Its parts chained on the CPU EP equal the
    whole QDQ graph exactly, and the joined EPContext graph on the HTP simulator equals the whole graph
    compiled as one context (Q(DQ(x)) = x at the part boundaries)."""
    import shutil

    from litedge.export import onnx_io, qnn_backend, qnn_ep
    from litedge.export.onnx_io import cpu_session

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    monkeypatch.setattr(qnn_backend, "BLOCKS_PER_PART", 1)
    kept = tmp_path / "kept"
    kept.mkdir()

    def in_parts(qdq, out, soc, blocks, compile_in_parts=qnn_backend.compile_in_parts):
        for f in qdq.parent.glob(qdq.name + "*"):
            shutil.copy(f, kept / f.name)
        return compile_in_parts(qdq, out, soc, blocks)

    monkeypatch.setattr(qnn_backend, "compile_in_parts", in_parts)
    model, path = student
    out = tmp_path / "m.litedge"
    code, _, err = _export([path, "--target", "snapdragon", "--weights", "int8", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    assert "2 blocks compiled as 2 QNN contexts of <= 1 blocks" in err
    comp = verify_bundle(out).components["transformer"]
    assert [e["file"] for e in comp.extra_files] == ["transformer_64x64.part00_qnn.bin", "transformer_64x64.part01_qnn.bin"]
    joined = onnx.load(str(out / comp.file))
    assert [n.op_type for n in joined.graph.node] == ["EPContext", "EPContext"]
    assert not list(out.glob("*.part*.onnx"))  # the per-part EPContext graphs were folded into the joined one

    qdq = next(kept.glob("*.qdq.onnx"))
    soc = SOCS["sm8650"]
    wrapper = transformer_wrapper(model)
    feed = denoising_calibration(wrapper, (8, 8), text_length=300, steps=3, trajectories=1, seed=7)[1]
    whole_cpu = cpu_session(qdq).run(None, feed)[0]
    env = dict(feed)
    parts = qnn_ep.split_graph(qdq, 1)
    assert [p.blocks for p in parts] == [(0, 0), (1, 1)]
    for k, part in enumerate(parts):  # each part computes its own block (not everything pushed to the last)
        names = [n.name for n in onnx.load(str(part.path), load_external_data=False).graph.node]
        assert sum(f"transformer_blocks.{k}/" in n for n in names) > 50, k
    for part in parts:
        session = cpu_session(part.path)
        names = [o.name for o in session.get_outputs()]
        env.update(zip(names, session.run(None, {i.name: env[i.name] for i in session.get_inputs()})))
    np.testing.assert_array_equal(env["noise_pred"], whole_cpu)
    whole_ctx = qnn_ep.compile_context(qdq, tmp_path / "whole" / "t.onnx", soc) if (tmp_path / "whole").mkdir() is None else None
    whole_htp = simulator_session(whole_ctx[0], soc).run(None, feed)[0]
    joined_htp = simulator_session(out / comp.file, soc).run(None, feed)[0]
    np.testing.assert_array_equal(joined_htp, whole_htp)
    assert float(np.abs(joined_htp - whole_cpu).max()) < 0.1 * float(np.abs(whole_cpu).max())


def test_contexts_that_do_not_load_together_are_each_loaded_alone(student, tmp_path, capsys, monkeypatch):
    """Where the joined multi-context model does not load on the simulator (LiT-T2I-XL at 1024 px:
    QNN_COMMON_ERROR_MEM_ALLOC with 4 contexts; the tiny model cannot reach that limit, so the
    joined load is refused here), the check loads each context alone, on the real simulator, and
    the bundle is written with both facts in its manifest and the export's report."""
    from litedge.export import onnx_io, qnn_backend, qnn_ep

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    monkeypatch.setattr(qnn_backend, "BLOCKS_PER_PART", 1)
    monkeypatch.setattr(qnn_backend, "SIMULATOR_BUDGET_S", 0.0)
    loads = []

    def simulator_session(path, soc):
        contexts = len(onnx.load(str(path), load_external_data=False).graph.node)
        loads.append(contexts)
        if contexts > 1:
            raise LitedgeError(f"{path.name}: the QNN HTP simulator ({soc.name}) cannot load the compiled model: "
                               "contextCreateFromBinary failed. Error: QNN_COMMON_ERROR_MEM_ALLOC")
        return qnn_ep.simulator_session(path, soc)

    monkeypatch.setattr(qnn_backend, "simulator_session", simulator_session)
    model, path = student
    out = tmp_path / "m.litedge"
    code, _, err = _export([path, "--target", "snapdragon", "--weights", "int8", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    assert loads == [2]  # the joined model once; the two single contexts through qnn_ep's own session
    assert "the 2 QNN contexts do not load on the HTP simulator together" in err
    assert "each of its 2 QNN contexts loads alone on the HTP simulator, not all together, not run there" in err
    bucket = verify_bundle(out).components["transformer"].meta["fidelity"]["buckets"]["64x64"]
    simulated = bucket["simulator"]
    assert simulated["together"].endswith("QNN_COMMON_ERROR_MEM_ALLOC") and simulated["ran"] is False
    assert [c["context"] for c in simulated["contexts"]] == ["transformer_64x64.part00_qnn.bin",
                                                             "transformer_64x64.part01_qnn.bin"]
    assert all(c["loaded_s"] >= 0 for c in simulated["contexts"])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("transformer", "."))) == [
        "transformer_64x64.onnx", "transformer_64x64.part00_qnn.bin", "transformer_64x64.part01_qnn.bin"]


def test_each_context_of_a_joined_model_loads_alone_and_a_broken_one_is_named(student, tmp_path, capsys,
                                                                             monkeypatch):
    """load_each_context on a real joined 2-context bundle: both load; with one binary truncated,
    one line names the model the simulator cannot load, and no one-node graph is left behind."""
    from litedge.export import onnx_io, qnn_backend, qnn_ep

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 64 * 1024)
    monkeypatch.setattr(qnn_backend, "BLOCKS_PER_PART", 1)
    model, path = student
    out = tmp_path / "m.litedge"
    code, _, err = _export([path, "--target", "snapdragon", "--weights", "int8", "--sizes", "64", "-o", out], capsys)
    assert code == 0, err
    joined = out / "transformer_64x64.onnx"
    assert len(qnn_ep.load_each_context(joined, SOCS["sm8650"])) == 2
    binary = out / "transformer_64x64.part01_qnn.bin"
    binary.write_bytes(binary.read_bytes()[:4096])
    with pytest.raises(LitedgeError, match=r"^\.transformer_64x64\.context01\.onnx: the QNN HTP simulator"):
        qnn_ep.load_each_context(joined, SOCS["sm8650"])
    assert not list(out.glob(".*context*"))


def test_split_refuses_a_graph_without_block_names(tmp_path):
    from onnx import TensorProto, helper

    from litedge.export.qnn_ep import split_graph

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/model/act/Relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(LitedgeError, match="no transformer_blocks.N node names"):
        split_graph(path, 4)


def test_a_context_the_simulator_cannot_load_is_one_line(tmp_path):
    """An EPContext graph whose QNN binary is not a context (as when the compiled contexts cannot be
    allocated) fails in one LitedgeError line naming the model, not an onnxruntime traceback."""
    from onnx import TensorProto, helper

    (tmp_path / "t_qnn.bin").write_bytes(b"not a QNN context" * 64)
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", name="ctx", embed_mode=0,
                            ep_cache_context="t_qnn.bin", main_context=1, source="QNN", partition_name="g")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]),
              str(path))
    with pytest.raises(LitedgeError, match=r"^t\.onnx: the QNN HTP simulator \(sm8650\) cannot load") as info:
        simulator_session(path, SOCS["sm8650"])
    assert "\n" not in str(info.value)
