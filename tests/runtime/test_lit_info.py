"""lit-info / litedge.runtime.bundle_info on a bundle of each target kind, and ``python -m litedge``.

The cpu bundles are real exports (the fp32 test fixture, the shipped int4 demo model); the
static-bucket (directml), coreml and snapdragon bundles are written here with BundleWriter
in the layout their exporters write (the meta fields of fp16_backend, coreml_backend and
qnn_backend), with small stand-in files: lit-info reads manifests and file sizes, never graphs.
"""

import json
import subprocess
import sys

import pytest

from litedge.bundle import BundleWriter
from litedge.cli.generate import build_parser as generate_parser
from litedge.cli.info import main
from litedge.demo import DEMO_BUNDLE
from litedge.runtime import bundle_info
from litedge.runtime.info import format_info
from litedge.runtime.memory import Model, Shape, estimate_bytes
from litedge.runtime.schedulers import SCHEDULERS
from litedge.runtime.vae import TILE

MODEL = {"family": "lit", "task": "text-to-image", "base": "pixart-sigma", "latent_channels": 4, "patch_size": 2,
         "sample_size": 8, "prediction_type": "epsilon", "learned_sigma": True, "text_max_length": 24,
         "vae_scale_factor": 8, "vae_scaling_factor": 0.13025}
DEFAULTS = {"steps": 20, "height": 64, "width": 64, "guidance_scale": 4.5}
T = {"dtype": "float32"}


def _info(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _static_bundle(out, target: dict, transformer_meta: dict, files: dict, extra: list, vae_file="vae_decoder.onnx",
                   fidelity=None):
    """A bundle in a static-shape target's layout, with ``files`` (name -> bytes) as stand-ins."""
    with BundleWriter(out, force=True) as w:
        for name, data in files.items():
            _write(w.path / name, data)
        first = next(n for n in files if n.startswith("transformer"))
        w.add_component("transformer", first, shapes=[[64, 64], [128, 128]], extra_files=extra, meta=transformer_meta,
                        inputs={"sample": {**T, "shape": [2, 4, "height", "width"]}})
        w.add_component("vae_decoder", vae_file, shapes=[[64, 64], [128, 128]], meta={"batch": 1})
        w.add_component("text_encoder", "text_encoder.onnx", meta={"precision": "fp32", "kind": "T5EncoderModel"})
        w.set(model=MODEL, target=target, defaults=DEFAULTS, scheduler={"type": "DPMSolverMultistepScheduler"},
              fidelity=fidelity or {})
    return out


@pytest.fixture(scope="module")
def directml_bundle(tmp_path_factory):
    files = {"transformer_64x64.onnx": b"a" * 3000, "transformer_128x128.onnx": b"b" * 5000,
             "vae_decoder.onnx": b"v" * 700, "text_encoder.onnx": b"t" * 900}
    meta = {"kind": "pixart", "precision": "fp16", "weights": "int4", "batch": 2, "text_length": 24,
            "buckets": {"64x64": "transformer_64x64.onnx", "128x128": "transformer_128x128.onnx"},
            "quantization": {"block_size": 32, "symmetric": True, "quantized": 42}}
    target = {"name": "directml", "format": "onnx", "providers": ["DmlExecutionProvider", "CPUExecutionProvider"],
              "precision": "fp16", "weights": "int4-block32"}
    return _static_bundle(tmp_path_factory.mktemp("dml") / "lit-dml.litedge", target, meta, files,
                          ["transformer_128x128.onnx"], fidelity={"transformer": {
                              "max_abs_err": 0.002, "rel_err": 0.0011, "vs": "torch-fp32"}})


@pytest.fixture(scope="module")
def snapdragon_bundle(tmp_path_factory):
    files = {"transformer_64x64.onnx": b"c" * 400, "transformer_64x64_qnn.bin": b"q" * 6000,
             "transformer_128x128.onnx": b"c" * 400, "transformer_128x128_qnn.bin": b"q" * 9000,
             "vae_decoder.onnx": b"v" * 700, "text_encoder.onnx": b"t" * 900}
    meta = {"kind": "pixart", "weights": "int8", "batch": 2, "text_length": 24,
            "buckets": {"64x64": "transformer_64x64.onnx", "128x128": "transformer_128x128.onnx"},
            "quantization": {"activations": "uint16", "weights": "int8", "weight_dtype": "uint8",
                             "granularity": "per-channel (Conv, Gemm)"},
            "qnn": {"soc": "sm8650", "soc_model": 57, "htp_arch": 75, "backend": "htp", "onnxruntime_qnn": "2.7.0",
                    "compile_s": {"64x64": 1.2}}}
    target = {"name": "snapdragon", "format": "qnn", "providers": ["QNNExecutionProvider"], "precision": "a16",
              "weights": "int8"}
    extra = ["transformer_64x64_qnn.bin", "transformer_128x128.onnx", "transformer_128x128_qnn.bin"]
    return _static_bundle(tmp_path_factory.mktemp("qnn") / "lit-qnn.litedge", target, meta, files, extra,
                          fidelity={"transformer": {"max_abs_err": 0.04, "rel_err": 0.006,
                                                    "vs": "torch-fp32 (QNN HTP simulator, sm8650)"}})


@pytest.fixture(scope="module")
def coreml_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "lit-coreml.litedge"
    with BundleWriter(out, force=True) as w:
        for name, size in (("transformer", 4000), ("vae_decoder", 800), ("text_encoder", 900)):
            _write(w.path / f"{name}.mlpackage" / "Data" / "weights" / "weight.bin", b"w" * size)
            _write(w.path / f"{name}.mlpackage" / "Manifest.json", b"{}")
        functions = {"64x64": "latent_8x8", "128x128": "latent_16x16"}
        w.add_component("transformer", "transformer.mlpackage", shapes=[[64, 64], [128, 128]],
                        meta={"kind": "pixart", "compute_precision": "float16", "weights": "int4",
                              "deployment_target": "iOS18", "functions": functions})
        w.add_component("vae_decoder", "vae_decoder.mlpackage", shapes=[[64, 64], [128, 128]],
                        meta={"compute_precision": "float32", "functions": functions, "deployment_target": "iOS18"})
        w.add_component("text_encoder", "text_encoder.mlpackage", meta={"compute_precision": "float32"})
        w.set(model=MODEL, target={"name": "coreml", "format": "coreml", "providers": [], "precision": "fp16",
                                   "weights": "int4-block32"},
              defaults=DEFAULTS, scheduler={"type": "DPMSolverMultistepScheduler"},
              fidelity={"transformer": {"max_abs_err": 0.0, "rel_err": 0.0, "vs": "skipped (prediction needs macOS)"}})
    return out


def test_cpu_fp32_bundle(pixart_bundle, capsys):
    info = bundle_info(pixart_bundle)
    comps = info["components"]
    assert set(comps) == {"transformer", "vae_decoder", "text_encoder"}
    for name, c in comps.items():
        on_disk = sum((pixart_bundle / f).stat().st_size for f in [c["file"]] + [
            e["file"] for e in json.loads((pixart_bundle / "manifest.json").read_text())["components"][name].get(
                "extra_files", [])])
        assert c["bytes"] == on_disk > 0
    assert info["total_bytes"] == sum(c["bytes"] for c in comps.values())
    assert info["sizes"] == "dynamic" and info["target"]["name"] == "cpu" and comps["transformer"]["weights"] == "fp"
    assert comps["transformer"]["inputs"]["sample"] == "float32[batch, 4, height, width]"
    assert info["native_size"] == "64x64" and info["trained_sizes"] == [64]  # lit-export's default: the native size
    # the memory figure is the request check's own estimate at the default size
    from litedge.bundle import load_manifest

    manifest = load_manifest(pixart_bundle)
    d = manifest.defaults
    expected = estimate_bytes(Model.of(manifest, pixart_bundle), Shape(d["height"], d["width"], 1, True, vae_tile=TILE))
    assert info["memory"]["estimate_bytes"] == expected > info["memory"]["weights_bytes"] == info["total_bytes"]

    code, out, err = _info([pixart_bundle], capsys)
    assert code == 0, err
    for text in ("pixart.litedge", "target      cpu: onnx, fp32 activations", "dynamic shapes", "transformer.onnx",
                 "fidelity", "memory      ~", "defaults    ", "native size 64x64 px; trained at 64 px"):
        assert text in out, text
    code, out, _ = _info([pixart_bundle, "--json", "--verify"], capsys)
    assert code == 0 and json.loads(out) == json.loads(json.dumps(bundle_info(pixart_bundle, verify=True)))


def test_cpu_int4_bundle_the_shipped_demo(capsys):
    code, out, err = _info([DEMO_BUNDLE], capsys)
    assert code == 0, err
    assert "int4-block32 weights" in out and "fp32 act, int4 weights" in out and "quantization block_size=32" in out
    assert "transformer_int4" in out  # the int4 graph's fidelity vs its fp32 graph


def test_static_bucket_directml_bundle(directml_bundle, capsys):
    info = bundle_info(directml_bundle)
    t = info["components"]["transformer"]
    assert info["sizes"] == ["64x64", "128x128"] and t["buckets"] == {"64x64": "transformer_64x64.onnx",
                                                                       "128x128": "transformer_128x128.onnx"}
    assert t["bytes"] == 8000 and t["files"] == 2 and t["precision"] == "fp16" and t["weights"] == "int4"
    assert t["meta"]["fixed batch"] == 2 and info["components"]["text_encoder"]["precision"] == "fp32"
    code, out, _ = _info([directml_bundle], capsys)
    assert code == 0
    for text in ("64x64, 128x128 (static graphs, one per size)", "DmlExecutionProvider", "fixed batch 2",
                 "fixed text length 24", "transformer_64x64.onnx +1 files", "rel err 0.0011"):
        assert text in out, text


def test_snapdragon_bundle(snapdragon_bundle, capsys):
    info = bundle_info(snapdragon_bundle)
    t = info["components"]["transformer"]
    assert t["qnn"] == {"soc": "sm8650", "soc_model": 57, "htp_arch": 75, "backend": "htp", "onnxruntime_qnn": "2.7.0"}
    assert t["bytes"] == 400 + 6000 + 400 + 9000 and t["quantization"]["activations"] == "uint16"
    code, out, _ = _info([snapdragon_bundle], capsys)
    assert code == 0
    for text in ("snapdragon: qnn, a16 activations, int8 weights", "qnn soc=sm8650 soc_model=57 htp_arch=75",
                 "activations=uint16", "QNN HTP simulator, sm8650", "+3 files"):
        assert text in out, text


def test_coreml_bundle(coreml_bundle, capsys):
    info = bundle_info(coreml_bundle)
    t = info["components"]["transformer"]
    assert t["bytes"] == 4002 and t["precision"] == "float16" and t["weights"] == "int4"  # every file of the package
    assert t["meta"]["deployment"] == "iOS18" and t["meta"]["functions"] == {"64x64": "latent_8x8",
                                                                               "128x128": "latent_16x16"}
    code, out, _ = _info([coreml_bundle], capsys)
    assert code == 0
    for text in ("coreml: coreml, fp16 activations", "deployment iOS18", "latent_16x16", "skipped (prediction needs macOS)",
                 "64x64, 128x128 (static graphs"):
        assert text in out, text
    assert "runs with" not in out.splitlines()[3]  # no providers listed for Core ML


def test_bad_bundles_are_one_line(pixart_bundle, tmp_path, capsys):
    code, _, err = _info([tmp_path / "nope.litedge"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such bundle directory" in err
    (tmp_path / "empty.litedge").mkdir()
    code, _, err = _info([tmp_path / "empty.litedge"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("lit-info: error: ")
    import shutil

    copy = tmp_path / "copy.litedge"
    shutil.copytree(pixart_bundle, copy)
    data = bytearray((copy / "vae_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "vae_decoder.onnx").write_bytes(bytes(data))
    assert _info([copy], capsys)[0] == 0  # without --verify only the manifest is read
    code, _, err = _info([copy, "--verify"], capsys)
    assert code == 2 and "sha256" in err


def test_format_info_is_text_of_the_dict(directml_bundle):
    text = format_info(bundle_info(directml_bundle))
    assert text.splitlines()[0].startswith("lit-dml.litedge  (litedge-bundle v1")


def test_python_m_litedge_lists_and_dispatches(pixart_bundle):
    run = lambda *a: subprocess.run([sys.executable, "-m", "litedge", *map(str, a)], capture_output=True, text=True,
                                    timeout=120)
    listed = run()
    assert listed.returncode == 0
    for name in ("distill", "export", "generate", "profile", "info"):
        assert f"lit-{name}" in listed.stdout
    info = run("info", pixart_bundle, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["name"] == "pixart.litedge"
    bad = run("frobnicate")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown command 'frobnicate'" in bad.stderr


def test_lit_generate_help_lists_every_scheduler():
    text = " ".join(generate_parser().format_help().split())
    for name in {cls.short_name for cls in SCHEDULERS.values()}:
        assert name in text, name
    assert "flow-euler (flow matching" in text


def test_lit_info_is_torch_free(pixart_bundle):
    code = ("import sys\n"
            "for m in ('torch', 'diffusers', 'transformers', 'onnx'): sys.modules[m] = None\n"
            "from litedge.cli.info import main\n"
            f"assert main([{str(pixart_bundle)!r}, '--json']) == 0\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["target"]["name"] == "cpu"
