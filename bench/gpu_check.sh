#!/usr/bin/env bash
# One GPU check (issues 9, 16), about 8 minutes on one modern GPU; each step's table as it ends, one summary at the end.
#
#   bash bench/gpu_check.sh                                  # logs in $GPU_CHECK_OUT (default: a new temporary folder)
#   GPU_CHECK_STEPS="speed-mednext stages" bash bench/gpu_check.sh   # only those steps
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh                  # print the plan (steps, limits, commands), run nothing
#   GPU_CHECK_LIMIT_S=30 bash bench/gpu_check.sh             # every step's time limit replaced (a trial run)
#
# Steps, in this order, each with its own time limit (seconds, default run 490 s, about 8 minutes):
#   tests             100  the CUDA-marked tests (Testing/python/test_cuda.py and the device-path tests)
#   speed-mednext     120  bench_official.py --device cuda --arch mednext: MedNeXt-S first (the slowest; 8
#                          mirrored passes), one timed round, official fp32 / volseg auto / volseg fp32 only
#   speed-uxnet        90  the same for 3D UX-Net (2 rounds, every variant row)
#   speed-segformer3d  55  the same for SegFormer3D (2 rounds, every variant row), then one profiled call each of
#                          official and volseg auto (top operators by GPU time: what surrounds its 0.1 s network)
#   stages            130  every stage of `volseg segment` (bench_stages.py --device cuda; issue 15), uxnet-amos
#                          (GPU_CHECK_STAGES_CARDS="uxnet-amos mednext-nnunet-kits19-template" adds MedNeXt's card:
#                          its CPU baseline alone outlasts this limit)
#   memory            150  (not in the default run) the 512x512x800 memory check (bench_memory.py --device cuda)
# "speed" names the three speed steps. Issue 16's targets: volseg auto >= 2x the official fp32 recipe,
# peak GPU memory no higher, labels >= 99.9 % as fp32.
#
# Without CUDA it runs what the CPU can (the CUDA tests skip except device selection, a tiny speed
# run, the stages at small sizes) and says so in the table.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/VolSegSlicer${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
ALL_STEPS="tests speed-mednext speed-uxnet speed-segformer3d stages memory"
STEPS="${GPU_CHECK_STEPS:-tests speed stages}"
STEPS=" ${STEPS//speed / speed-mednext speed-uxnet speed-segformer3d } "
STEPS="${STEPS// speed / speed-mednext speed-uxnet speed-segformer3d }"
STEPS=" $(echo $STEPS) "
for s in $STEPS; do
  case " $ALL_STEPS " in
    *" $s "*) ;;
    *) echo "gpu_check: unknown step '$s' in GPU_CHECK_STEPS; the steps are: $ALL_STEPS (speed = the three speed-* steps)" >&2
       exit 2;;
  esac
done
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

if [ -n "${GPU_CHECK_MODE:-}" ]; then
  MODE=$GPU_CHECK_MODE
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=cuda
else
  MODE=cpu-only
fi
case "$MODE" in cuda|cpu-only) ;; *) echo "gpu_check: GPU_CHECK_MODE must be cuda or cpu-only, not '$MODE'" >&2; exit 2;; esac
DRY="${GPU_CHECK_DRY:-}"
if [ -z "$DRY" ]; then
  OUT="${GPU_CHECK_OUT:-$(mktemp -d -t volseg-gpu-check.XXXXXX)}"
  mkdir -p "$OUT"
  : > "$OUT/summary.tsv"
  echo "gpu_check: mode $MODE, steps$STEPS, logs in $OUT"
else
  echo "gpu_check: mode $MODE, steps$STEPS (dry run: the plan only)"
fi

step() {  # step NAME TIMEOUT_S COMMAND...: runs it under its own limit, then prints its tables at once
  local name=$1 limit=${GPU_CHECK_LIMIT_S:-$2}
  shift 2
  if [ -n "$DRY" ]; then
    echo "  plan: $name ${limit}s: $*"
    return 0
  fi
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/summary.tsv"
  echo "  $name: exit $rc ($(( $(date +%s) - t0 )) s)$(case $rc in 124|137) echo ' TIME LIMIT: what it printed so far follows';; esac)"
  # the tables and per-row lines it printed (all of them, also when the time limit cut it short)
  grep -E '^\||^GPU:|^[a-z0-9]+: |^  [a-z].*: median|^  profile|^    |passed|failed|error' "$OUT/$name.log" | tail -n 120 \
    | sed 's/^/    /'
}

CUDA_TESTS="Testing/python/test_cuda.py Testing/python/test_export_prediction.py Testing/python/test_on_device.py"
if [ "$MODE" = cuda ]; then
  has tests && step tests 100 "$PY" -m pytest $CUDA_TESTS -m cuda -q -rs -p no:cacheprovider
  has speed-mednext && step speed-mednext 120 "$PY" bench/bench_official.py --device cuda --arch mednext \
    --repeats 1 --core-rows
  has speed-uxnet && step speed-uxnet 90 "$PY" bench/bench_official.py --device cuda --arch uxnet --repeats 2
  has speed-segformer3d && step speed-segformer3d 55 "$PY" bench/bench_official.py --device cuda --arch segformer3d \
    --repeats 2 --profile
  has stages && step stages 130 "$PY" bench/bench_stages.py --device cuda --slices "${GPU_CHECK_SLICES:-100}" \
    --back-slices 100 --cards ${GPU_CHECK_STAGES_CARDS:-uxnet-amos}
  has memory && step memory 150 "$PY" bench/bench_memory.py --device cuda --compare-size 128 128 100
else
  has tests && step tests 240 "$PY" -m pytest $CUDA_TESTS -m cuda -q -rs -p no:cacheprovider
  has speed-mednext && step speed-mednext 200 "$PY" bench/bench_official.py --quick --runtimes torch --arch mednext
  has speed-uxnet && step speed-uxnet 200 "$PY" bench/bench_official.py --quick --runtimes torch --arch uxnet
  has speed-segformer3d && step speed-segformer3d 200 "$PY" bench/bench_official.py --quick --runtimes torch \
    --arch segformer3d
  has stages && step stages 300 "$PY" bench/bench_stages.py --quick
  has memory && step memory 300 "$PY" bench/bench_memory.py --quick
fi
[ -n "$DRY" ] && exit 0

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
    if name == "tests":
        m = re.findall(r"(\d+) (passed|failed|skipped|error)", text)
        return ", ".join(f"{n} {w}" for n, w in m) or "no summary"
    if name.startswith("speed"):
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
    status = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"FAILED ({rc})")
    print(f"| {name} | {status} | {secs} | {figures(name)} | {out / (name + '.log')} |")
sys.exit(0 if all(rc == "0" for _, rc, _ in rows) else 1)
EOF
