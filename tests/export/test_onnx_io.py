"""save_onnx: one graph file, or graph + one page-aligned .onnx.data, from any starting layout."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from litedge.export.onnx_io import cpu_session, file_bytes, model_files, save_onnx


def two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 64), dtype=np.float32), rng.standard_normal((64, 4), dtype=np.float32)
    shift = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rng.standard_normal((3, 64), dtype=np.float32)))
    graph = helper.make_graph(
        [shift, helper.make_node("MatMul", ["x", "a"], ["h0"]), helper.make_node("Add", ["h0", "c"], ["h"]),
         helper.make_node("MatMul", ["h", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_tensor_external_files_are_consolidated(tmp_path):
    """The layout torch's exporter writes past 2 GB (one file per tensor) becomes one .data file."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(two_matmuls(), str(src / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    assert len(list(src.iterdir())) == 4  # graph, two weights, the Constant's tensor
    x = np.random.default_rng(1).standard_normal((3, 8), dtype=np.float32)  # n = 3 rows, like the Constant
    ref = cpu_session(src / "m.onnx").run(None, {"x": x})[0]

    model = onnx.load(str(src / "m.onnx"), load_external_data=False)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    files = save_onnx(model, out, base_dir=src)
    assert files == [out, out.parent / "m.onnx.data"] == model_files(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(cpu_session(out).run(None, {"x": x})[0], ref)
    assert file_bytes(out) == sum(p.stat().st_size for p in files)


def test_small_models_stay_one_file(tmp_path):
    files = save_onnx(two_matmuls(), tmp_path / "m.onnx")
    assert files == [tmp_path / "m.onnx"] == model_files(tmp_path / "m.onnx")
