"""Student vs softmax teacher at PixArt-Sigma-XL width (1152), random weights, onnxruntime CPU.

One process measures, side by side and under the same machine load:

- the machine's fp32 matmul rate (ORT MatMul and torch.mm, 4096^3, best of 3);
- one denoising step (batch 2: cond + uncond, 300 text tokens) of a LiT student and of
  its softmax teacher (``lit-export --teacher``: attention in query chunks), for each
  ``--weights`` and ``--sizes``, through lit-profile's own measurement (median of
  ``--repeat`` after a warm-up), with each step's matmul FLOPs (counted from the config,
  :func:`step_flops`) as a fraction of the matmul rate, and the measured teacher/student
  ratio next to the FLOP ratio;
- ``--layer-scan 2,4,6``: the student at each depth, with lit-profile ``--ops`` (operator
  groups, achieved rate per group, arena size), a least-squares fit ``step = fixed +
  per_layer * layers``, and each depth's deviation from it.

Depth is overridden on the named config (``LiT-T2I-XL`` with ``num_layers`` replaced, a
bench-local registry entry); ``--student-layers 28`` adds the full-depth student.
Heavy: run it as ``flock /tmp/litedge-heavy.lock nice -n 5 python bench/xl_speed.py ...``.

    python bench/xl_speed.py --sizes 512,1024,2048 --weights fp,int4
    python bench/xl_speed.py --layer-scan 2,4,6 --sizes 1024 --no-teacher --weights fp
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from litedge.export.bundle_export import ExportConfig, export_bundle
from litedge.models import configs
from litedge.profile.measure import profile_bundle

BASE = "LiT-T2I-XL"
TEXT = 300  # PixArt-Sigma's prompt tokens
BATCH = 2  # cond + uncond


def cpu_name() -> str:
    """``lscpu``'s model name and core count: named beside every timing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores"
    except (OSError, subprocess.CalledProcessError):
        return f"{os.uname().machine}, {os.cpu_count()} cores"


def matmul_rates(n: int = 4096, xl: tuple[int, int, int] = (2 * 4096, 1152, 4 * 1152)) -> dict[str, float]:
    """fp32 GFLOP/s of one n^3 matmul, best of 5: onnxruntime's MatMul (the kernels the bundles
    run) and torch.mm, per wall second (``ort``, ``torch``) and per CPU second of this process
    (``ort_cpu``, ``torch_cpu``: what one pinned thread does when the core is shared); and
    onnxruntime's rate on the XL step's own largest GEMM shape ``xl`` (M, K, N: the MLP's
    batch 2 x 4096 tokens, 1152 -> 4608), ``ort_xl`` / ``ort_xl_cpu``, whose weight (21 MB)
    sits in the cache where 4096^3's operands (3 x 64 MB) do not."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from litedge.runtime.devices import DEVICES
    from litedge.runtime.session import session_options

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", "k"]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, ["k", "n"])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(DEVICES["cpu"]),
                                   providers=["CPUExecutionProvider"])
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    xa, xb = np.random.rand(xl[0], xl[1]).astype(np.float32), np.random.rand(xl[1], xl[2]).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rates = {}
    for name, fn, flop in (("ort", lambda: session.run(None, {"a": a, "b": b}), 2 * n**3),
                           ("torch", lambda: torch.mm(ta, tb), 2 * n**3),
                           ("ort_xl", lambda: session.run(None, {"a": xa, "b": xb}), 2 * xl[0] * xl[1] * xl[2])):
        fn()
        runs = [_seconds(fn, cpu=True) for _ in range(5)]
        rates[name] = flop / min(r[0] for r in runs) / 1e9
        rates[f"{name}_cpu"] = flop / min(r[1] for r in runs) / 1e9
    return rates


def set_threads(threads: int | None) -> int:
    """One thread count for onnxruntime (``LITEDGE_THREADS``, read by every session litedge opens)
    and torch (the matmul-rate reference and the export's parity checks); default: the cores of
    this process's affinity. Returns the count."""
    import torch

    from litedge.runtime.session import cpu_threads

    if threads is not None:
        os.environ["LITEDGE_THREADS"] = str(threads)
    n = cpu_threads()
    torch.set_num_threads(n)
    return n


def _seconds(fn, cpu: bool = False):
    """Wall seconds of ``fn()``; with ``cpu``, (wall, this process's CPU seconds)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall = time.perf_counter() - start
    return (wall, time.process_time() - start_cpu) if cpu else wall


def step_flops(layers: int, size: int, *, teacher: bool, width: int = 1152, student_heads: int = 2,
               caption: int = 4096, text: int = TEXT, batch: int = BATCH) -> float:
    """Matmul + convolution FLOPs (2 per multiply-add) of one PixArt-XL step at ``size`` px.

    Per block, N = (size / 16)^2 tokens, C = width, L = text tokens: projections 4 N C^2
    (self-attention q, k, v, out), cross-attention 2 N C^2 + 2 L C^2 + 2 N L C, MLP 8 N C^2;
    softmax self-attention 2 N^2 C; LiT's linear attention 2 N C (C / heads) and its 5x5
    depthwise conv 25 N C. Outside the blocks: the caption MLP (L x 4096 -> C -> C), patch
    embedding, the adaLN-single timestep MLP (6 C^2) and the final layer (N C 32).
    """
    n, c, L = (size // 16) ** 2, width, text
    block = 4 * n * c * c + 2 * n * c * c + 2 * L * c * c + 2 * n * L * c + 8 * n * c * c
    block += 2 * n * n * c if teacher else 2 * n * c * (c // student_heads) + 25 * n * c
    outside = L * caption * c + L * c * c + n * 4 * 4 * c + 256 * c + c * c + 6 * c * c + n * c * 32
    return 2.0 * batch * (layers * block + outside)


def register(layers: int) -> str:
    """A bench-local config: LiT-T2I-XL with ``layers`` blocks (its student and its teacher).

    ``sample_size`` 64 (512 px) sets the size the export traces and checks parity at (4x
    cheaper than 1024) and the position table's base grid (its values, not its cost); the
    graph computes the table for any size. Random weights: only the timing matters."""
    spec = configs.get_config(BASE)
    name = f"{BASE}-{layers}L"
    configs.CONFIGS[name] = dataclasses.replace(
        spec, name=name, teacher_config={**spec.teacher_config, "num_layers": layers, "sample_size": 64})
    return name


def transformer_source(work: Path, name: str, teacher: bool) -> Path:
    """A transformer-only source directory (random fp32 weights) of config ``name``: student or
    softmax teacher. Transformer only: ``--config --random-weights`` would build the whole
    pipeline (T5-XXL, VAE), which a step timing does not need."""
    from litedge.models.student import save_transformer

    out = work / f"{name}-{'teacher' if teacher else 'student'}-src"
    if not (out / "config.json").is_file():
        save_transformer(configs.build_model(name, teacher=teacher), out, force=True)
    return out


def bundle(work: Path, layers: int, weights: str, teacher: bool, *, target: str = "cpu", name: str | None = None) -> Path:
    """Export (once; reused from ``work``) the student or teacher bundle of the ``layers``-deep
    XL config (or of config ``name``), transformer only."""
    name = name or register(layers)
    out = work / f"{name}-{'teacher' if teacher else 'student'}-{weights}-{target}.litedge"
    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        export_bundle(ExportConfig(out=out, source=transformer_source(work, name, teacher), target=target,
                                   weights=weights, teacher=teacher, text_max_length=TEXT, force=True))
        print(f"# exported {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def measure(path: Path, size: int, repeat: int, ops: bool) -> dict:
    prof = profile_bundle(path, [(size, size)], repeat=repeat, steps=1, device="cpu", ops=ops).sizes[0]
    step = prof.components["transformer_step"]
    return {"median": step.median, "min": step.min, "max": step.max, "cpu": step.cpu,
            "rss_gb": prof.peak_rss_mb / 1024, "ops": prof.op_stats}


def _row(label: str, size: int, r: dict, flops: float, rate: float) -> str:
    achieved = flops / r["cpu"] / 1e9
    return (f"| {label} | {size} | {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | {r['cpu']:.2f} | "
            f"{flops / 1e12:.2f} | {achieved:.0f} | {achieved / rate:.0%} | {r['rss_gb']:.1f} |")


def speed_table(args, work: Path, rate: float) -> None:
    print("\n| model | px | step s wall, median (min-max) | step CPU s | TFLOP | GFLOP/s (CPU) | of matmul rate | "
          "peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for weights in args.weights:
        for size in args.sizes:
            student = measure(bundle(work, args.layers, weights, False), size, args.repeat, False)
            fs = step_flops(args.layers, size, teacher=False)
            print(_row(f"LiT student {args.layers}L {weights}", size, student, fs, rate), flush=True)
            if args.teacher:
                teacher = measure(bundle(work, args.layers, weights, True), size, args.repeat, False)
                ft = step_flops(args.layers, size, teacher=True)
                print(_row(f"softmax teacher {args.layers}L {weights}", size, teacher, ft, rate), flush=True)
                ratios.append((weights, size, teacher["cpu"] / student["cpu"], teacher["median"] / student["median"],
                               ft / fs))
            for layers in args.student_layers:
                full = measure(bundle(work, layers, weights, False), size, args.repeat, False)
                print(_row(f"LiT student {layers}L {weights}", size, full, step_flops(layers, size, teacher=False),
                           rate), flush=True)
    if ratios:
        print("\n| weights | px | teacher / student, CPU s (wall) | FLOP ratio | measured / FLOP ratio |")
        print("| --- | --- | --- | --- | --- |")
        for weights, size, measured, wall, flop in ratios:
            print(f"| {weights} | {size} | {measured:.2f} ({wall:.2f}) | {flop:.2f} | {measured / flop:.2f} |")


def layer_scan(args, work: Path, rate: float) -> None:
    for size in args.sizes:
        steps = {}
        print(f"\n| student layers ({size} px, fp32) | step s wall, median (min-max) | step CPU s | of matmul rate | "
              "arena MB |")
        print("| --- | --- | --- | --- | --- |")
        for layers in args.layer_scan:
            ops = args.ops_layers is None or layers <= args.ops_layers
            r = measure(bundle(work, layers, "fp", False), size, args.repeat, ops)
            steps[layers] = r
            achieved = step_flops(layers, size, teacher=False) / r["cpu"] / 1e9
            arena = f"{r['ops']['arena_mb']:.0f}" if r["ops"] else "-"
            print(f"| {layers} | {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | {r['cpu']:.2f} | "
                  f"{achieved / rate:.0%} | {arena} |", flush=True)
        xs = np.array(sorted(steps), dtype=float)
        ys = np.array([steps[int(x)]["cpu"] for x in xs])  # CPU seconds: a shared core stretches only the wall time
        per_layer, fixed = np.polyfit(xs, ys, 1)
        print(f"\nfit (CPU s): step = {fixed:.2f} s + {per_layer:.2f} s x layers; per-layer cost of each depth "
              "(step - fixed) / layers vs the fit:")
        for x, y in zip(xs, ys):
            print(f"  {int(x)} layers: {(y - fixed) / x:.2f} s/layer ({(y - fixed) / x / per_layer - 1:+.0%})")
        block = step_flops(1, size, teacher=False) - step_flops(0, size, teacher=False)
        print(f"  marginal layer: {block / per_layer / 1e9:.0f} GFLOP/s ({block / per_layer / 1e9 / rate:.0%} of the "
              f"matmul rate); fixed cost {fixed:.2f} s = {fixed / ys[-1]:.1%} of the {int(xs[-1])}-layer step "
              f"(its FLOPs outside the blocks: {step_flops(0, size, teacher=False) / 1e9:.0f} GFLOP)")
        profiled = [int(x) for x in xs if steps[int(x)]["ops"]]
        if not profiled:
            continue
        print(f"\nper operator group, {profiled[-1]} layers (s per step, share, GFLOP/s of its matmul work):")
        deepest = steps[profiled[-1]]["ops"]
        total = sum(g["seconds"] for g in deepest["groups"].values())
        for group, g in sorted(deepest["groups"].items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"  {group:18s} {g['seconds']:7.2f} s  {g['seconds'] / total:5.1%}  {g['gflops']:6.0f} GFLOP/s")
        print("  top op types: " + ", ".join(f"{op} {s:.2f} s" for op, s in list(deepest["op_types"].items())[:8]))
        print(f"  kernels {total:.2f} s of the profiled run's {deepest['run_seconds']:.2f} s")


def fusion_ab(args, work: Path, rate: float) -> None:
    """The fp32 student graph vs the same graph with onnxruntime's transformer fusions
    (:func:`litedge.export.fp16_backend.fuse_fp32`, the CPU-runnable set), interleaved runs
    in one process, and their difference (fp32 parity must stay < 1e-4)."""
    import onnx

    from litedge.bundle import verify_bundle
    from litedge.export.fp16_backend import fuse_fp32, fused_op_counts

    path = bundle(work, args.layers, "fp", False)
    comp = verify_bundle(path).components["transformer"]
    fused_path = work / f"xl{args.layers}-student-fp-fused.onnx"
    if not fused_path.is_file():
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path / comp.file)))
        fused = fuse_fp32(model, "transformer")
        print(f"# fusions: {fused_op_counts(fused)}")
        onnx.save(fused, str(fused_path))
        del model, fused
    interleaved(f"{args.layers}L student fp32", {"plain": path / comp.file, "fused": fused_path}, comp,
                args.sizes, args.repeat)


def interleaved(label: str, graphs: dict[str, Path], comp, sizes: list[int], repeat: int) -> None:
    """Two graphs of one component (same inputs) timed in alternation in this process, CPU
    seconds per step (median of ``repeat`` after a warm-up each), and their outputs' max
    difference relative to the first's max (meaningful when both hold the same weights)."""
    import onnxruntime as ort

    from litedge.profile.inputs import synthetic_feed
    from litedge.runtime.devices import DEVICES
    from litedge.runtime.session import session_options

    sessions = {name: ort.InferenceSession(str(p), session_options(DEVICES["cpu"]), providers=["CPUExecutionProvider"])
                for name, p in graphs.items()}
    (a, sa), (b, sb) = sessions.items()
    for size in sizes:
        feed = synthetic_feed(comp, {"batch": BATCH, "height": size // 8, "width": size // 8, "text_length": TEXT})
        outs = {name: s.run(None, feed)[0] for name, s in sessions.items()}  # warm-up
        rel = float(np.abs(outs[b] - outs[a]).max() / np.abs(outs[a]).max())
        times: dict[str, list[float]] = {a: [], b: []}
        for _ in range(repeat):
            for name, s in sessions.items():
                times[name].append(_seconds(lambda: s.run(None, feed), cpu=True)[1])
        ta, tb = (float(np.median(times[k])) for k in (a, b))
        print(f"| {label}, {size} px | {a} {ta:.3f} CPU s | {b} {tb:.3f} CPU s | {b} / {a} {tb / ta:.3f} | "
              f"output difference {rel:.1e} |", flush=True)


def bundle_ab(args) -> None:
    """``--ab A B``: the transformers of two bundles (e.g. exported before / after a rewrite),
    interleaved (:func:`interleaved`), with each one's export parity from its manifest."""
    from litedge.bundle import verify_bundle

    comps = {p: verify_bundle(p).components["transformer"] for p in args.ab}
    for p in args.ab:
        parity = (verify_bundle(p).fidelity.get("transformer") or {}).get("rel_err", float("nan"))
        print(f"# {p.name}: {len(_nodes(p / comps[p].file))} nodes; export parity vs PyTorch fp32 rel err {parity:.1e}")
    interleaved("transformer", {"A": args.ab[0] / comps[args.ab[0]].file, "B": args.ab[1] / comps[args.ab[1]].file},
                comps[args.ab[0]], args.sizes, args.repeat)


def _nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--weights", default="fp,int4", type=lambda s: s.split(","))
    parser.add_argument("--layers", type=int, default=4, help="depth of the student/teacher pair")
    parser.add_argument("--student-layers", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="extra student depths to time, e.g. 28")
    parser.add_argument("--layer-scan", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="student depths for the linearity check with --ops (fp32), e.g. 2,4,6")
    parser.add_argument("--ops-layers", type=int, default=None,
                        help="--layer-scan profiles operator groups only up to this depth (a 28-layer "
                             "profiled run costs two more steps)")
    parser.add_argument("--no-teacher", dest="teacher", action="store_false")
    parser.add_argument("--fusion-ab", action="store_true",
                        help="time the fp32 student graph with and without onnxruntime's transformer fusions")
    parser.add_argument("--ab", nargs=2, type=Path, metavar=("A", "B"),
                        help="time the transformers of two bundles interleaved (e.g. before / after a rewrite)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op and torch threads (default: the cores of this process's "
                             "affinity, e.g. 1 under taskset -c 1)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "litedge-xl-speed")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    threads = set_threads(args.threads)
    rates = matmul_rates()
    rate = max(rates["ort_cpu"], rates["ort_xl_cpu"])
    print(f"# {cpu_name()}; pinned to cores {sorted(os.sched_getaffinity(0))}; onnxruntime and torch threads {threads}; "
          f"fp32 matmul per CPU s: 4096^3 ORT {rates['ort_cpu']:.0f} GFLOP/s, torch.mm {rates['torch_cpu']:.0f}; "
          f"XL MLP GEMM 8192x1152x4608 ORT {rates['ort_xl_cpu']:.0f} (per wall s: {rates['ort']:.0f}, "
          f"{rates['torch']:.0f}, {rates['ort_xl']:.0f}); fractions below are of the higher ORT rate per CPU s "
          f"({rate:.0f}), steps in CPU s; load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.ab:
        bundle_ab(args)
    elif args.fusion_ab:
        fusion_ab(args, args.work, rate)
    elif args.layer_scan:
        layer_scan(args, args.work, rate)
    else:
        speed_table(args, args.work, rate)
    rates = matmul_rates()
    print(f"\n# matmul rate again at the end, per CPU s: 4096^3 ORT {rates['ort_cpu']:.0f} GFLOP/s, torch.mm "
          f"{rates['torch_cpu']:.0f}, XL GEMM ORT {rates['ort_xl_cpu']:.0f} (per wall s: {rates['ort']:.0f}, "
          f"{rates['torch']:.0f}, {rates['ort_xl']:.0f}); load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
