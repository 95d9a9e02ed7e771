"""lit-export --teacher: the softmax teacher exported with attention in query chunks.

The rewritten graph must equal the unmodified PyTorch teacher (fp32, rel err < 1e-4) and
never hold the (B, heads, N, N) score tensor: checked with onnxruntime's profiler, which
records every node's output size, subgraph (Loop body) nodes included.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from litedge.bundle import verify_bundle
from litedge.cli.export import main
from litedge.errors import LitedgeError
from litedge.export.onnx_export import export_transformer
from litedge.export.rewrites import bound_attention_, bounded_attention, chunked_attention, teacher_for_export
from litedge.models.configs import build_model
from litedge.models.loading import LoadedModel
from litedge.models.linearize import linearize_config_of
from tests.export.test_cli_export import _onnx_feed
from tests.models.test_linearize import forward_inputs, randomize

HEADS = 4  # tiny-LiT-T2I-XL's teacher


def test_chunked_attention_equals_sdpa_at_every_chunking():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 29, 8), torch.randn(2, 3, 29, 5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for budget in (1, 2 * 3 * 29 * 16, 2 * 3 * 29 * 20, 1 << 30):  # chunks of 16, 16, 20 and all 37 queries
        got = chunked_attention(q, k, v, 8 ** -0.5, budget)
        assert torch.allclose(got, ref, atol=1e-6), budget


def test_bounded_attention_is_undone_after_the_block():
    model = build_model("tiny-LiT-T2I-XL", teacher=True)
    before = [type(m.processor) for m in model.modules() if hasattr(m, "processor")]
    with pytest.raises(RuntimeError), bounded_attention(model):
        raise RuntimeError("boom")
    assert [type(m.processor) for m in model.modules() if hasattr(m, "processor")] == before


def _teacher_graph(tmp_path, budget):
    model = randomize(build_model("tiny-LiT-T2I-XL", teacher=True), seed=3)
    reference = randomize(build_model("tiny-LiT-T2I-XL", teacher=True), seed=3)  # processors untouched
    bound_attention_(model, budget=budget)
    result = export_transformer(model, tmp_path / "teacher.onnx", sample_size=(16, 16))
    return reference, result


def test_teacher_graph_matches_the_unmodified_pytorch_teacher(tmp_path):
    budget = 2 * HEADS * 64 * 16  # 16-query chunks at the traced 64 tokens: the Loop runs 4 times
    reference, result = _teacher_graph(tmp_path, budget)
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert ops.count("Loop") == 2  # one per block's self-attention
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for height, width in ((16, 16), (12, 20)):  # traced size and another one (48 / 60 tokens)
        kw = forward_inputs(reference, height=height, width=width)
        with torch.no_grad():
            ref = reference(**kw).sample.numpy()
        got = session.run(None, _onnx_feed(reference, kw))[0]
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_teacher_graph_never_holds_the_whole_score_matrix(tmp_path):
    budget = 2 * HEADS * 64 * 16
    reference, result = _teacher_graph(tmp_path, budget)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    session = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    n = 16 * 16  # a 32x32 latent: 256 tokens, scores (2, 4, 256, 256) = 2 MB whole
    kw = forward_inputs(reference, height=32, width=32)
    session.run(None, _onnx_feed(reference, kw))
    events = json.loads(open(session.end_profiling()).read())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    softmax = [int(e["args"]["output_size"]) for e in nodes if e["args"].get("op_name") == "Softmax"]
    whole = 2 * HEADS * n * n * 4
    chunk_bytes = 2 * HEADS * n * max(16, budget // (2 * HEADS * n)) * 4
    assert max(int(e["args"].get("output_size", 0)) for e in nodes) < whole / 2  # largest: the MLP hidden, 1/4
    assert max(softmax) <= chunk_bytes < whole  # self-attention chunks; cross-attention is N x 8 tokens


def test_lit_export_teacher_writes_a_softmax_bundle_with_chunked_attention(tmp_path, capsys):
    out = tmp_path / "teacher.litedge"
    code = main(["--config", "tiny-LiT-T2I-XL", "--random-weights", "--teacher", "--weights", "fp", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = verify_bundle(out)
    assert manifest.model["family"] == "softmax"
    assert manifest.fidelity["transformer"]["rel_err"] < 1e-4
    graph = onnx.load(str(out / manifest.components["transformer"].file))
    assert "Loop" in [n.op_type for n in graph.graph.node]


def test_teacher_of_a_student_is_refused():
    student = build_model("tiny-LiT-T2I-XL")
    loaded = LoadedModel(student, "pixart", linearize_config_of(student), source="student/")
    with pytest.raises(LitedgeError, match="holds no teacher weights"):
        teacher_for_export(loaded)
