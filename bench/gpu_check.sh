#!/usr/bin/env bash
# One GPU check (issue 9), about 8 minutes on one modern GPU; prints one table at the end.
#
#   bash bench/gpu_check.sh            # logs in $GPU_CHECK_OUT (default: a new temporary folder)
#
# 1. the test suite's CUDA-marked tests (Testing/python/test_cuda.py): deformable conv CUDA vs CPU,
#    AMP on/off agreement per architecture, the OOM fallback forced by a per-process memory cap,
#    device selection;
# 2. the speed benchmark against each official recipe on CUDA (bench/bench_official.py --device cuda;
#    issue 16: volseg auto >= 2x the official fp32 recipe at realistic volumes, labels >= 99.9 % as fp32,
#    peak GPU memory no higher; about 3 minutes);
# 3. the 512x512x800 memory check through the 16-class AMOS card (bench/bench_memory.py --device cuda;
#    budgets: <= 8 GB RSS, <= 7 GB GPU);
# 4. every stage of `volseg segment`, today's path vs the torch stages, on 512x512x100
#    (bench/bench_stages.py --device cuda; issue 15).
#
# Without CUDA it runs what the CPU can (the CUDA tests skip except device selection, a tiny speed
# run, the memory check at small sizes) and says so in the table.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/VolSegSlicer${PYTHONPATH:+:$PYTHONPATH}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t volseg-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
: > "$OUT/summary.tsv"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=cuda
else
  MODE=cpu-only
fi
echo "gpu_check: mode $MODE, logs in $OUT"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/summary.tsv"
  echo "  $name: exit $rc ($(( $(date +%s) - t0 )) s)"
}

# GPU_CHECK_STEPS picks the steps (default: all four); the limits keep the default run near 7 minutes.
STEPS="${GPU_CHECK_STEPS:-tests speed stages memory}"
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
CUDA_TESTS="Testing/python/test_cuda.py Testing/python/test_export_prediction.py Testing/python/test_on_device.py"
if [ "$MODE" = cuda ]; then
  has tests && step cuda-tests 100 "$PY" -m pytest $CUDA_TESTS -m cuda -q -rs -p no:cacheprovider
  has speed && step speed 140 "$PY" bench/bench_official.py --device cuda --repeats 2
  has stages && step stages 160 "$PY" bench/bench_stages.py --device cuda --slices "${GPU_CHECK_SLICES:-100}" \
    --back-slices 100 --cards uxnet-amos mednext-nnunet-kits19-template
  has memory && step memory 150 "$PY" bench/bench_memory.py --device cuda --compare-size 128 128 100
else
  has tests && step cuda-tests 240 "$PY" -m pytest $CUDA_TESTS -m cuda -q -rs -p no:cacheprovider
  has speed && step speed 300 "$PY" bench/bench_official.py --quick --runtimes torch
  has stages && step stages 300 "$PY" bench/bench_stages.py --quick
  has memory && step memory 300 "$PY" bench/bench_memory.py --quick
fi

"$PY" - "$OUT" "$MODE" <<'EOF'
import re, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]


def log(name):
    p = out / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def figures(name):
    text = log(name)
    if name == "cuda-tests":
        m = re.findall(r"(\d+) (passed|failed|skipped|error)", text)
        return ", ".join(f"{n} {w}" for n, w in m) or "no summary"
    if name == "speed":
        got, official_peak = [], "?"
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) > 3 and cells[0].endswith(("cuda amp", "volseg torch")):
                got.append(f"{cells[0]} {cells[2]} (labels {cells[4]} %)")
            elif len(cells) > 8 and cells[0].endswith(": official fp32"):
                official_peak = cells[4]
            elif len(cells) > 8 and cells[0].endswith(": volseg auto"):
                got.append(f"{cells[0]} {cells[2]}, peak {cells[4]} MiB (official {official_peak}), {cells[5]} "
                           f"(labels {cells[7]} % / fp32 {cells[8]} %)")
        return "; ".join(got) or "no table"
    if name == "memory":
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) > 8 and cells[0].startswith("one class at a time, full size"):
                return f"{cells[1]}: peak RSS {cells[4]} MiB, GPU peak {cells[8]} MiB, {cells[-1]}"
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) > 8 and cells[0] == "one class at a time":
                return f"{cells[1]}: peak RSS {cells[4]} MiB, {cells[6]} B/voxel, labels {cells[-1]}"
        return "no table"
    if name == "stages":
        got = []
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 15 and cells[1] == "volseg":
                got.append(f"{cells[0]}: whole {cells[8]} s ({cells[10]}), pre+post {cells[9]} s ({cells[11]}), "
                           f"GPU {cells[13]} MiB, agree {cells[14]} %")
            elif len(cells) == 6 and cells[0].startswith("volseg: export_labelmap"):
                got.append(f"way back alone {cells[1]} s ({cells[2]})")
        return "; ".join(got) or "no table"
    return ""


print(f"\n## gpu_check ({mode}{': no CUDA here, only the CPU-only parts ran' if mode != 'cuda' else ''})\n")
print("| check | exit | s | figures | log |")
print("|---|---:|---:|---|---|")
for name, rc, secs in rows:
    status = "ok" if rc == "0" else ("TIMEOUT" if rc == "124" else f"FAILED ({rc})")
    print(f"| {name} | {status} | {secs} | {figures(name)} | {out / (name + '.log')} |")
sys.exit(0 if all(rc == "0" for _, rc, _ in rows) else 1)
EOF
