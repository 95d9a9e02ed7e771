#!/usr/bin/env bash
# The cuda path end to end, in one script that fits 8 minutes on a GPU machine:
#   1. installs what is missing: litedge with its export extra, onnxruntime-gpu in place of
#      onnxruntime (skipped when the CUDA EP is already there);
#   2. exports cuda-target bundles: a tiny LiT student and teacher, a 4-layer XL-width
#      (1152) student and its softmax teacher (lit-export --teacher: chunked attention);
#   3. runs each transformer on the CUDA EP (the runtime's session: IO binding) and on the
#      CPU EP, and fails if they differ past 5% relative (fp16 vs fp16-weights-in-fp32);
#   4. prints student vs teacher step times at 1024 and 2048 px on the CUDA EP.
#
#   bash bench/gpu_check.sh [--dry-run] [--work DIR] [--python PY]
#
# --dry-run: everything on the CPU EP with the tiny bundles only (64 and 128 px), no
# installs: the test suite runs this. Exit status 0 when every step passed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
dry_run=""
work="${TMPDIR:-/tmp}/litedge-gpu-check"
python="${PYTHON:-python}"
budget=480  # seconds: the whole check must fit 8 minutes
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run="--dry-run"; shift ;;
    --work) work="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --work DIR, --python PY)" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
step() { echo "== $* ($(( $(date +%s) - start )) s)"; }

step "machine"
"$python" - <<'EOF'
import os, platform, subprocess
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or "none"
except (OSError, subprocess.SubprocessError):
    gpu = "none (no nvidia-smi)"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
print(f"cpu: {cpu}, {os.cpu_count()} cores; gpu: {gpu}")
EOF

if [ -z "$dry_run" ]; then
  step "install"
  if ! "$python" -c "import litedge.export.bundle_export" 2>/dev/null; then
    "$python" -m pip install -q -e "$root[export]"
  fi
  if ! "$python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    version="$("$python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)"
    "$python" -m pip uninstall -q -y onnxruntime || true
    "$python" -m pip install -q "onnxruntime-gpu${version:+==$version}" || "$python" -m pip install -q onnxruntime-gpu
  fi
  "$python" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
fi

step "export ${dry_run:+(dry run: tiny only)}"
timeout "$(left)" "$python" "$here/_gpu_check.py" export "$work" $dry_run
step "parity and step times"
timeout "$(left)" "$python" "$here/_gpu_check.py" check "$work" $dry_run
step "done in $(( $(date +%s) - start )) s (budget $budget s)"
