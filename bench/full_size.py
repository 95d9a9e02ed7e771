"""Full-size pipelines on this machine: build, export, generate, with time and peak memory per component.

    python bench/full_size.py --work /work/fullsize                       # the three cpu int4 pipelines
    python bench/full_size.py --work /work/fullsize --models LiT-T2I-XL --targets cpu,snapdragon,coreml

For each named config (LiT-T2I-XL: PixArt-Sigma XL + SDXL-type VAE + T5-XXL; EDiT-PixArt-Sigma;
MM-EDiT-SD3.5-Medium: SD3.5-M MM-DiT + CLIP-L + CLIP-G + T5-XXL + 16-channel VAE) it

1. builds the complete random-weight pipeline (bf16 shards, as real checkpoints are stored;
   reused when ``WORK/<name>`` exists; PixArt-based ones share one T5-XXL by hard links),
2. exports it (``lit-export``) for each target, watching the process's resident memory,
3. generates one 1024x1024 image with 2 steps (``litedge.runtime.Pipeline``) on each cpu bundle,

and prints one row per component: file size, export time and peak RSS (from the export's own
stage lines and /proc, sampled every 0.2 s), and for the whole generation its peak RSS, text
encoding time, time per denoising step (batch 2: guidance) and VAE decode time. Every step runs
in its own process; its peak is that process's VmHWM (``wait4`` maxrss). A watchdog kills a step
whose RSS passes ``--rss-limit-gb`` so a run can never take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGE = re.compile(r"^lit-export: (text_encoder(?:_\d)?|transformer|vae_decoder)\b")
PROMPT = "a small cabin in the snow at dusk, warm light in the windows"
PIPELINE_DIRS = {"LiT-T2I-XL": "lit-t2i-xl", "EDiT-PixArt-Sigma": "edit-pixart-sigma",
                 "MM-EDiT-SD3.5-Medium": "mm-edit-sd3.5-medium"}


@dataclass
class Run:
    """One subprocess: wall time, peak RSS (bytes), output, and RSS/time split by stage label."""

    seconds: float
    peak_rss: int
    returncode: int
    output: str
    stages: dict[str, dict] = field(default_factory=dict)  # label -> {"seconds", "peak_rss"}


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it (lit-export compiles QNN parts in
    child processes: the watchdog must see them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def run(cmd: list[str], *, rss_limit: int, label_of=None, timeout: float = 3600) -> Run:
    """Run ``cmd``, sampling its RSS; kill it past ``rss_limit`` bytes or ``timeout`` seconds.

    ``label_of(line)`` names the stage a printed line starts (None: same stage), so each
    stage gets its own time and peak RSS.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # its own process group: a kill reaches its children
    stages: dict[str, dict] = {}
    current = {"label": "setup", "since": start, "peak": 0}
    lines: list[str] = []
    killed: list[str] = []

    def close_stage(now: float) -> None:
        entry = stages.setdefault(current["label"], {"seconds": 0.0, "peak_rss": 0})
        entry["seconds"] += now - current["since"]
        entry["peak_rss"] = max(entry["peak_rss"], current["peak"])

    def watch() -> None:
        while proc.poll() is None:
            rss = _rss(proc.pid)
            current["peak"] = max(current["peak"], rss)
            if rss > rss_limit and not killed:
                killed.append(f"killed by the bench's watchdog at {rss / 2**30:.1f} GiB (limit {rss_limit / 2**30:.1f})")
                _kill_group(proc)
            if time.perf_counter() - start > timeout and not killed:
                killed.append(f"killed after {timeout:.0f} s")
                _kill_group(proc)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:
        lines.append(line)
        sys.stderr.write("    | " + line)
        label = label_of(line) if label_of else None
        if label and label != current["label"]:
            now = time.perf_counter()
            close_stage(now)
            current.update(label=label, since=now, peak=_rss(proc.pid))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    close_stage(time.perf_counter())
    output = "".join(lines) + "".join(f"\n{k}" for k in killed)
    return Run(time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode, output, stages)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def build(name: str, work: Path, rss_limit: int) -> dict:
    """The random pipeline of ``name`` in WORK (reused if there), with its build figures."""
    out = work / PIPELINE_DIRS[name]
    if (out / "model_index.json").is_file():
        return {"pipeline": str(out), "reused": True}
    cmd = [sys.executable, "-m", "litedge.models.random_pipeline", name, str(out)]
    if name == "EDiT-PixArt-Sigma" and (work / PIPELINE_DIRS["LiT-T2I-XL"]).is_dir():
        cmd += ["--reuse-text-encoders-from", str(work / PIPELINE_DIRS["LiT-T2I-XL"])]
    r = run(cmd, rss_limit=rss_limit)
    if r.returncode:
        raise SystemExit(f"building {name} failed:\n{r.output[-2000:]}")
    return {"pipeline": str(out), "build_seconds": r.seconds, "build_peak_rss": r.peak_rss}


def export(pipeline: Path, target: str, out: Path, rss_limit: int, extra: list[str], timeout: float = 3600) -> Run:
    label = lambda line: (m.group(1) if (m := STAGE.match(line)) else None)  # noqa: E731
    cmd = [sys.executable, "-m", "litedge.cli.export", str(pipeline), "--target", target, "-o", str(out), "--force", *extra]
    return run(cmd, rss_limit=rss_limit, label_of=label, timeout=timeout)


def generate(bundle: Path, size: int, steps: int, rss_limit: int, low_memory: bool) -> tuple[Run, dict]:
    cmd = [sys.executable, __file__, "_generate", str(bundle), "--size", str(size), "--steps", str(steps)]
    r = run(cmd + (["--low-memory"] if low_memory else []), rss_limit=rss_limit)
    figures = {}
    for line in r.output.splitlines():
        if line.startswith("FIGURES "):
            figures = json.loads(line[len("FIGURES "):])
    return r, figures


def _generate_main(argv: list[str]) -> None:
    """Child process: one image, timing text encoding, each step and the decode through the public API."""
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--low-memory", action="store_true")
    a = p.parse_args(argv)
    from litedge.runtime import Pipeline

    t_open = time.perf_counter()
    pipe = Pipeline.from_bundle(a.bundle, low_memory=a.low_memory)
    marks: list[float] = []
    text: list[tuple[float, float]] = []  # (start, end) of each encode_text call: timed, not inferred
    encode_text = pipe.encode_text

    def timed_encode_text(texts):
        start = time.perf_counter()
        try:
            return encode_text(texts)
        finally:
            text.append((start, time.perf_counter()))

    pipe.encode_text = timed_encode_text
    t0 = time.perf_counter()
    out = pipe(prompt=PROMPT, num_inference_steps=a.steps, height=a.size, width=a.size, generator=0,
               callback_on_step_end=lambda *args: (marks.append(time.perf_counter()), {})[1])
    t_end = time.perf_counter()
    # step i ends at marks[i]; the first starts when the last text encoding ends (latents are set up in ms)
    starts = [text[-1][1] if text else t0, *marks[:-1]]
    steps = [m - s for s, m in zip(starts, marks)]
    image = out.images[0]
    image.save(Path(a.bundle).with_suffix(f".{a.size}.png"))
    print("FIGURES " + json.dumps({
        "open_seconds": t0 - t_open, "text_seconds": sum(e - s for s, e in text),
        "step_seconds": sum(steps) / max(len(steps), 1), "steps_seconds": steps,
        "decode_seconds": t_end - marks[-1], "total_seconds": t_end - t0, "image": list(image.size),
    }), flush=True)


def component_sizes(bundle: Path) -> dict[str, int]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    sizes = {}
    for name, comp in manifest["components"].items():
        files = [comp["file"], *(e["file"] if isinstance(e, dict) else e for e in comp.get("extra_files", []))]
        sizes[name] = sum(_bytes(bundle / f) for f in files)
    return sizes


def _bytes(path: Path) -> int:
    """A file's size, or every file's under a directory (an ``.mlpackage``); 0 if missing."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        return _generate_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the pipelines and bundles (tens of GB)")
    ap.add_argument("--models", default=",".join(PIPELINE_DIRS), help="configs, comma-separated")
    ap.add_argument("--targets", default="cpu", help="cpu, snapdragon, coreml (snapdragon/coreml: LiT-T2I-XL only)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rss-limit-gb", type=float, default=22.0)
    ap.add_argument("--timeout-h", type=float, default=3.0,
                    help="kill an export running longer than this (hours; the snapdragon LiT-T2I-XL export "
                         "with its compile in parts takes over one hour on one core)")
    ap.add_argument("--low-memory", action="store_true", help="generate with one component session at a time")
    ap.add_argument("--reuse-bundles", action="store_true",
                    help="skip the export of a bundle that already exists in WORK/bundles (its manifest is there); "
                         "measure only what follows (file sizes, generation)")
    ap.add_argument("--no-generate", action="store_true", help="export only")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    limit = int(a.rss_limit_gb * 2**30)
    (a.work / "bundles").mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), platform.processor())
    print(f"machine: {model}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    results = []
    for name in a.models.split(","):
        built = build(name, a.work, limit)
        pipeline = Path(built["pipeline"])
        for target in a.targets.split(","):
            if target != "cpu" and name != "LiT-T2I-XL":
                continue
            extra = {"cpu": ["--weights", "int4"], "snapdragon": ["--sizes", str(a.size)],
                     "coreml": ["--weights", "int4", "--sizes", str(a.size)]}[target]
            bundle = a.work / "bundles" / f"{PIPELINE_DIRS[name]}-{target}.litedge"
            if a.reuse_bundles and (bundle / "manifest.json").is_file():
                print(f"== {name} -> {target}: reusing {bundle} (not exported again)", flush=True)
                row = {"model": name, "target": target, **built, "bundle": str(bundle), "export_reused": True,
                       "export_ok": True, "stages": {}}
                ex = None
            else:
                print(f"== {name} -> {target}: exporting", flush=True)
                ex = export(pipeline, target, bundle, limit, extra, timeout=a.timeout_h * 3600)
                row = {"model": name, "target": target, **built, "bundle": str(bundle), "export_seconds": ex.seconds,
                       "export_peak_rss": ex.peak_rss, "export_ok": ex.returncode == 0, "stages": ex.stages}
            if ex is not None and ex.returncode != 0:
                row["error"] = ex.output.strip().splitlines()[-1] if ex.output.strip() else f"exit {ex.returncode}"
            else:
                row["sizes"] = component_sizes(bundle)
                row["bundle_bytes"] = sum(row["sizes"].values())
                if target == "cpu" and not a.no_generate:
                    print(f"== {name}: generating {a.size}x{a.size}, {a.steps} steps", flush=True)
                    gen, figures = generate(bundle, a.size, a.steps, limit, a.low_memory)
                    row.update(generate_peak_rss=gen.peak_rss, generate_ok=gen.returncode == 0, **figures)
                    if gen.returncode:
                        row["generate_error"] = gen.output.strip().splitlines()[-1]
            results.append(row)
            _print_rows([row])
    print("\n## Summary")
    _print_rows(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


def _print_rows(rows: list[dict]) -> None:
    print("| model | target | component | file GB | export s | export peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        for comp, st in r["stages"].items():
            size = r.get("sizes", {}).get(comp)
            print(f"| {r['model']} | {r['target']} | {comp} | {_gb(size) if size is not None else '-'} | "
                  f"{st['seconds']:.0f} | {_gb(st['peak_rss'])} |")
        total = _gb(r["bundle_bytes"]) if "bundle_bytes" in r else "-"
        if r.get("export_reused"):
            print(f"| {r['model']} | {r['target']} | **whole bundle (reused, not exported)** | {total} | - | - |")
            continue
        print(f"| {r['model']} | {r['target']} | **whole export** | {total} | {r['export_seconds']:.0f} | "
              f"{_gb(r['export_peak_rss'])} |" + (f" FAILED: {r['error']}" if "error" in r else ""))
    gens = [r for r in rows if "generate_peak_rss" in r]
    if gens:
        print("\n| model | 1024 px generation peak RSS GB | text encoding s | step s (batch 2) | VAE decode s | total s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in gens:
            if r.get("generate_ok"):
                print(f"| {r['model']} | {_gb(r['generate_peak_rss'])} | {r['text_seconds']:.1f} | {r['step_seconds']:.1f} | "
                      f"{r['decode_seconds']:.1f} | {r['total_seconds']:.0f} |")
            else:
                print(f"| {r['model']} | {_gb(r['generate_peak_rss'])} | FAILED: {r.get('generate_error')} | | | |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
