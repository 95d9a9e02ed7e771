"""What is in a bundle, without running it: ``lit-info BUNDLE`` and :func:`bundle_info` (torch-free).

::

    from litedge.runtime import bundle_info
    info = bundle_info("lit.litedge")        # a JSON-ready dict
    info["components"]["transformer"]["bytes"], info["memory"]["estimate_bytes"]
    print(format_info(info))                 # what lit-info prints

Only the manifest and the files' sizes are read (``verify=True`` also checks every sha256).
The memory figure is :func:`litedge.runtime.memory.estimate_bytes` (the same estimate a
request is checked against) at the bundle's default size, one image, its default guidance:
the component files' bytes plus the activations of that request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from litedge.bundle import Component, Manifest, load_manifest, resolve_path, verify_bundle
from litedge.errors import LitedgeError
from litedge.runtime.memory import Model, Shape, estimate_bytes
from litedge.runtime.vae import default_tiling

# A request is "far" from a model's trained sizes when its area is more than this factor above or
# below the area of the nearest one (side s -> s * s): 2048 px is 4x 1024 px's area, 1448 px 2x.
TRAINED_AREA_RATIO = 2.0

# component meta keys worth showing, as (key, label); everything else stays in --json
_META = (("kind", "kind"), ("precision", "precision"), ("weights", "weights"), ("compute_precision", "compute"),
         ("deployment_target", "deployment"), ("batch", "fixed batch"), ("text_length", "fixed text length"),
         ("functions", "functions"), ("latent_scaling", "latent scaling"))


def _bytes_of(bundle_dir: Path, rel: str) -> int:
    """Size of a bundle file, or of every file under a directory (an ``.mlpackage``); 0 if missing."""
    path = resolve_path(bundle_dir, rel)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def _tensor(spec: dict) -> str:
    """``float32[batch, 4, height, width]``."""
    return f"{spec.get('dtype', '?')}[{', '.join(map(str, spec.get('shape', [])))}]"


def _component(bundle_dir: Path, comp: Component, target: dict) -> dict[str, Any]:
    files = [comp.file, *(e["file"] for e in comp.extra_files)]
    meta = comp.meta
    out: dict[str, Any] = {
        "file": comp.file, "files": len(files), "bytes": sum(_bytes_of(bundle_dir, f) for f in files),
        "shapes": comp.shapes if comp.shapes == "dynamic" else [f"{h}x{w}" for h, w in comp.shapes],
        "precision": meta.get("precision", meta.get("compute_precision", target.get("precision"))),
        "weights": meta.get("weights", "fp" if "quantization" not in meta else target.get("weights")),
        "inputs": {name: _tensor(spec) for name, spec in comp.inputs.items()},
        "outputs": {name: _tensor(spec) for name, spec in comp.outputs.items()},
        "meta": {label: meta[key] for key, label in _META if key in meta and key not in ("precision", "weights")},
    }
    if meta.get("buckets"):
        out["buckets"] = dict(meta["buckets"])
    if isinstance(meta.get("qnn"), dict):
        qnn = meta["qnn"]
        out["qnn"] = {k: qnn[k] for k in ("soc", "soc_model", "htp_arch", "backend", "onnxruntime_qnn") if k in qnn}
    if meta.get("ai_hub"):
        out["ai_hub"] = meta["ai_hub"]
    quant = meta.get("quantization")
    if isinstance(quant, dict):
        keep = ("block_size", "symmetric", "quantized", "activations", "weight_dtype", "granularity")
        out["quantization"] = {k: quant[k] for k in keep if k in quant}
    return out


def _sizes(manifest: Manifest) -> list[str] | str:
    """The image sizes every image component runs at: "dynamic", or the shared static "HxW" list."""
    sizes = None
    for name in ("transformer", "vae_decoder"):
        comp = manifest.components.get(name)
        if comp is None or comp.shapes == "dynamic":
            continue
        keys = [f"{h}x{w}" for h, w in comp.shapes]
        sizes = keys if sizes is None else [k for k in sizes if k in keys]
    return "dynamic" if sizes is None else sizes


def memory_estimate(manifest: Manifest, bundle_dir: Path, height: int, width: int, batch: int = 1,
                    guided: bool = True) -> dict[str, Any]:
    """The bytes one generation needs: the component files plus the activations at ``height`` x
    ``width`` pixels, ``batch`` images (:func:`litedge.runtime.memory.estimate_bytes`)."""
    model = Model.of(manifest, bundle_dir)
    static_vae = bool(manifest.components.get("vae_decoder") and manifest.components["vae_decoder"].meta.get("buckets"))
    vae = manifest.components.get("vae_decoder")
    tile = default_tiling(model.factor, vae.meta.get("decoder_channels") if vae else None)[0]  # as the Pipeline
    total = estimate_bytes(model, Shape(height, width, batch, guided, vae_tile=None if static_vae else tile))
    return {"estimate_bytes": int(total), "weights_bytes": int(model.weights),
            "at": {"height": height, "width": width, "batch": batch, "guided": guided}}


def trained_sizes(model: dict[str, Any]) -> list[int]:
    """The square image sizes (px) a manifest's ``model`` section says the model was trained at; [] if none."""
    sizes = model.get("trained_sizes")
    return [int(s) for s in sizes] if isinstance(sizes, list) else []


def trained_size_warning(model: dict[str, Any], height: int, width: int) -> str | None:
    """One line when ``height`` x ``width`` px is far from every trained size, else None.

    Far: the requested area is more than :data:`TRAINED_AREA_RATIO` (2x) larger or smaller
    than the area of the nearest trained size (a trained size ``s`` is ``s`` x ``s``). A
    manifest without ``trained_sizes`` never warns.
    """
    sizes = trained_sizes(model)
    if not sizes:
        return None
    area = height * width
    nearest = min(max(area, s * s) / min(area, s * s) for s in sizes)
    if nearest <= TRAINED_AREA_RATIO:
        return None
    return (f"{height}x{width} px is far from the sizes this model was trained at ({', '.join(map(str, sizes))} px): "
            "expect repeated or broken content; use a size within 2x the area of one of those for its best images")


def bundle_info(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Everything ``lit-info`` shows about the bundle at ``path``, as a JSON-ready dict.

    Keys: ``path``, ``name``, ``format``, ``version``, ``created_by``, ``model``, ``target``,
    ``components`` (file, bytes, shapes, precision, weights, inputs, outputs, target-specific
    meta, buckets), ``total_bytes``, ``sizes`` ("dynamic" or the static "HxW" list),
    ``native_size`` ("HxW": the manifest's ``native_size``, else sample_size x VAE factor),
    ``trained_sizes`` (when the manifest records them), ``defaults``, ``scheduler``, ``fidelity`` (rel / max abs error per check),
    ``memory`` (:func:`memory_estimate` at the default size) and ``verified`` (sha256 checked).

    Raises:
        LitedgeError: no such directory, or not a valid bundle (a bad sha256 with ``verify``).
    """
    bundle_dir = Path(path)
    if not bundle_dir.is_dir():
        raise LitedgeError(f"{bundle_dir}: no such bundle directory; pass a NAME.litedge folder made by lit-export")
    manifest = verify_bundle(bundle_dir) if verify else load_manifest(bundle_dir)
    m, d = manifest.model, manifest.defaults
    factor = int(m.get("vae_scale_factor", 8))
    components = {name: _component(bundle_dir, comp, manifest.target) for name, comp in manifest.components.items()}
    native = m.get("native_size") or (int(m["sample_size"]) * factor if isinstance(m.get("sample_size"), int) else None)
    height = int(d.get("height") or native or 1024)
    width = int(d.get("width") or height)
    guided = float(d.get("guidance_scale", 4.5)) != 1.0
    return {
        "path": str(bundle_dir), "name": bundle_dir.resolve().name, "format": manifest.format,
        "version": manifest.version, "created_by": manifest.created_by, "model": dict(m),
        "target": dict(manifest.target), "components": components,
        "total_bytes": sum(c["bytes"] for c in components.values()), "sizes": _sizes(manifest),
        "native_size": f"{native}x{native}" if native else None, "trained_sizes": m.get("trained_sizes"),
        "defaults": dict(d), "scheduler": manifest.scheduler.get("type"),
        "fidelity": {name: {k: f[k] for k in ("rel_err", "max_abs_err", "vs") if k in f}
                     for name, f in manifest.fidelity.items() if isinstance(f, dict)},
        "memory": memory_estimate(manifest, bundle_dir, height, width, 1, guided), "verified": verify,
    }


def _human(n: int | float) -> str:
    """Bytes as ``12.3 MB`` / ``1.2 GB`` (powers of 1000, as file managers show them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_info(info: dict[str, Any]) -> str:
    """The text ``lit-info`` prints for a :func:`bundle_info` dict."""
    m, t, d = info["model"], info["target"], info["defaults"]
    lines = [f"{info['name']}  ({info['format']} v{info['version']}, {info['created_by']}"
             f"{', sha256 verified' if info['verified'] else ''})"]
    model = [m.get("family", "?"), m.get("task", "?")]
    if m.get("base"):
        model.append(f"from {m['base']}")
    model.append(f"{m.get('latent_channels', '?')} latent channels, VAE factor {m.get('vae_scale_factor', '?')}, "
                 f"patch {m.get('patch_size', '?')}, {m.get('prediction_type', '?')} prediction")
    if m.get("text_max_length"):
        model.append(f"{m['text_max_length']} prompt tokens")
    lines.append("model       " + ", ".join(map(str, model)))
    native = info["native_size"] or "?"
    trained = info["trained_sizes"]
    lines.append(f"native size {native} px" + (f"; trained at {', '.join(map(str, trained))} px" if trained else
                                              " (trained sizes not recorded)"))
    target = f"{t.get('name', '?')}: {t.get('format', '?')}, {t.get('precision', '?')} activations, " \
             f"{t.get('weights', '?')} weights"
    if t.get("providers"):
        target += f", runs with {', '.join(t['providers'])}"
    lines.append("target      " + target)
    sizes = info["sizes"]
    lines.append("sizes       " + ("any multiple of VAE factor x patch (dynamic shapes)" if sizes == "dynamic"
                                   else f"{', '.join(sizes)} (static graphs, one per size)"))
    lines.append(f"defaults    {d.get('steps', '?')} steps, guidance {d.get('guidance_scale', '?')}, "
                 f"{d.get('width', '?')}x{d.get('height', '?')} px, scheduler {info['scheduler']}")
    lines.append(f"components  {len(info['components'])} ({_human(info['total_bytes'])})")
    for name, c in info["components"].items():
        shapes = "dynamic" if c["shapes"] == "dynamic" else ",".join(c["shapes"])
        extra = f" +{c['files'] - 1} files" if c["files"] > 1 else ""
        lines.append(f"  {name:<15} {c['file'] + extra:<36} {_human(c['bytes']):>9}  {c['precision'] or '?'} "
                     f"act, {c['weights'] or '?'} weights, {shapes}")
        details = [f"{k} {v}" for k, v in c["meta"].items()]
        if c.get("qnn"):
            details.append("qnn " + " ".join(f"{k}={v}" for k, v in c["qnn"].items()))
        if c.get("quantization"):
            details.append("quantization " + " ".join(f"{k}={v}" for k, v in c["quantization"].items()))
        if c.get("ai_hub"):
            details.append("ai_hub jobs recorded")
        lines.extend(f"  {'':<15} {item}" for item in details)
    if info["fidelity"]:
        lines.append("fidelity")
        for name, f in info["fidelity"].items():
            errors = ", ".join(f"{k.replace('_', ' ')} {f[k]:.2g}" for k in ("rel_err", "max_abs_err")
                               if isinstance(f.get(k), (int, float)))
            lines.append(f"  {name:<19} {errors}" + (f" vs {f['vs']}" if f.get("vs") else ""))
    mem = info["memory"]
    at = mem["at"]
    lines.append(f"memory      ~{_human(mem['estimate_bytes'])} for one {at['width']}x{at['height']} image"
                 f"{' with guidance' if at['guided'] else ''} ({_human(mem['weights_bytes'])} of files + "
                 "activations; an estimate from the manifest)")
    return "\n".join(lines)
