"""lit-profile on tiny bundles: table, JSON, CSV, plot, operator groups, bad input."""

import csv
import io
import json
import shutil

import pytest

from litedge.bundle import BundleWriter, load_manifest
from litedge.cli.profile import main
from litedge.export.bundle_export import ExportConfig, export_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    paths = []
    for name in ("tiny-LiT-T2I-XL", "tiny-EDiT-PixArt-Sigma"):
        out = root / f"{name}.litedge"
        export_bundle(ExportConfig(out=out, config_name=name, weights="fp"))
        paths.append(out)
    return paths


def test_two_bundles_three_sizes(bundles, tmp_path, capsys):
    code = main([*map(str, bundles), "--sizes", "64,128,96x160", "--repeat", "2", "--steps", "1", "--ops",
                 "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "CPUExecutionProvider" in out and "onnxruntime" in out  # the device is named
    assert out.count("tiny-EDiT-PixArt-Sigma") >= 3 and "96x160" in out

    report = json.loads((tmp_path / "p.json").read_text())
    assert len(report["profiles"]) == 2 and len(report["rows"]) == 6
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert len(rows) == 6 and all(float(r["transformer_step_median_ms"]) > 0 for r in rows)
    # Ratio columns against the first bundle: 1.0 for itself, measured for the second.
    assert {r["step_speedup_vs_first"] for r in rows[:3]} == {"1.0"}
    assert all(float(r["step_speedup_vs_first"]) > 0 for r in rows[3:])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for size in (s for p in report["profiles"] for s in p["sizes"]):
        groups = size["op_groups"]
        named = sum(v for k, v in groups.items() if k != "other")
        assert named >= 0.9 * sum(groups.values()), groups
        assert groups["self-attention"] > 0 and groups["cross-attention"] > 0 and groups["mlp"] > 0


def test_not_a_bundle(tmp_path, capsys):
    assert main([str(tmp_path), "--sizes", "64"]) == 2
    err = capsys.readouterr().err
    assert "not a litedge bundle" in err and err.count("\n") == 1


def test_repeat_zero(bundles, capsys):
    assert main([str(bundles[0]), "--sizes", "64", "--repeat", "0"]) == 2
    assert "--repeat 0" in capsys.readouterr().err


def test_size_outside_static_buckets(bundles, tmp_path, capsys):
    """A bundle with static shapes refuses a size it was not compiled for."""
    manifest = load_manifest(bundles[0])
    out = tmp_path / "static.litedge"
    with BundleWriter(out) as writer:
        component = manifest.components["transformer"]
        shutil.copy(bundles[0] / component.file, writer.path / component.file)
        writer.add_component("transformer", component.file, inputs=component.inputs, outputs=component.outputs,
                             shapes=[[64, 64]])
        writer.set(model=manifest.model, target=manifest.target, defaults=manifest.defaults)
    assert main([str(out), "--sizes", "64,128"]) == 2
    err = capsys.readouterr().err
    assert "128x128 is not one of this bundle's static shapes (64x64)" in err


def test_size_not_a_multiple_of_patch(bundles, capsys):
    assert main([str(bundles[0]), "--sizes", "100"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
