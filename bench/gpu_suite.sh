#!/usr/bin/env bash
# The GPU check of msam-fused in one script: build for this GPU, GPU tests, benchmarks.
#
#   OUT=/some/dir bench/gpu_suite.sh
#
# Runs with the machine's own python3 and torch (never a venv), from the repository root:
#   build     the extension for the local GPU's architecture, in place (setup.py build_ext)
#   tests     pytest -m gpu over tests/
#   micro     bench/micro.py (model parameter sets and a synthetic sweep, every backend)
#   speed     bench/speed_ratio.py on WRN-28-10, synthetic CIFAR shapes (the issue's targets),
#             MSAM's step overlapped with backward included
#   vit       bench/speed_ratio.py on ViT-S/32 with AdamW, SAM-AdamW, AdamW-MSAM (bf16)
#   torchrun  bench/speed_ratio.py under torchrun (DDP, one process per GPU)
# Each step has a time limit and the suite goes on when one fails; suite.json records every
# step's exit status and duration, suite.log their output, and the benchmarks write their
# JSON and PNG to $OUT as they finish, so an interrupted run still returns what it did.
# At most 8 files land in $OUT (what the device tool returns).
#
# Environment (defaults in brackets), e.g. to try the steps on a CPU:
#   SUITE_DEVICE=cpu SUITE_STEPS=micro,speed SUITE_MICRO_ARGS="--quick" bench/gpu_suite.sh
#   SUITE_STEPS       steps to run [build,tests,micro,speed,vit,torchrun]
#   SUITE_DEVICE      torch device [cuda]
#   SUITE_PYTHON      interpreter [python3]
#   SUITE_<STEP>_ARGS replaces a benchmark step's arguments (MICRO, SPEED, VIT, TORCHRUN)
#   SUITE_<STEP>_TIMEOUT seconds for a step (BUILD, TESTS, MICRO, SPEED, VIT, TORCHRUN)
#   SUITE_BUDGET      seconds for the whole suite [540]: a step gets at most what is left, and
#                     is skipped when less than 20 s are (the device tool stops a command at 600 s)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:?set OUT to the folder for results}
mkdir -p "$OUT"
PY=${SUITE_PYTHON:-python3}
DEVICE=${SUITE_DEVICE:-cuda}
STEPS=${SUITE_STEPS:-build,tests,micro,speed,vit,torchrun}
DEADLINE=$(( $(date +%s) + ${SUITE_BUDGET:-540} ))
LOG="$OUT/suite.log"
SUMMARY="$OUT/suite.json"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build and bench/ come first
: >"$LOG"
records=()

wants() { [[ ",$STEPS," == *",$1,"* ]]; }

write_summary() {
  local IFS=,
  printf '{"schema": "msam-fused/gpu-suite/1", "device": "%s", "date": "%s", "steps": [%s]}\n' \
    "$DEVICE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${records[*]}" >"$SUMMARY"
}

# run_step NAME TIMEOUT COMMAND...: run with a time limit, log the output, record the result.
run_step() {
  local name=$1 limit=$2 start rc left
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then
    echo "=== $name: skipped, the suite's time budget is spent" | tee -a "$LOG"
    records+=("{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"time budget spent\"}")
    write_summary
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name: $* (limit ${limit}s)" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
  records+=("{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
  write_summary
  return 0
}

echo "=== environment" >>"$LOG"
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print("gpu", i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1

if wants build; then
  arch=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null)
  run_step build "${SUITE_BUILD_TIMEOUT:-300}" env TORCH_CUDA_ARCH_LIST="${arch:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
  "$PY" -c "import msam_fused; print('backends on $DEVICE:', msam_fused.available_backends('$DEVICE'))" \
    >>"$LOG" 2>&1
fi

if wants tests; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    run_step tests "${SUITE_TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
  else
    echo "=== tests: pytest is not installed for $PY; skipped" | tee -a "$LOG"
    records+=('{"name": "tests", "rc": null, "seconds": 0, "skipped": "pytest not installed"}')
    write_summary
  fi
fi

if wants micro; then
  # shellcheck disable=SC2086  # the argument strings are meant to split into words
  run_step micro "${SUITE_MICRO_TIMEOUT:-240}" "$PY" bench/micro.py --device "$DEVICE" \
    ${SUITE_MICRO_ARGS:---sweep-totals 1M,16M,64M --sweep-tensors 1,64,1024 --repeats 30} \
    --out "$OUT/micro.json"
fi

if wants speed; then
  # shellcheck disable=SC2086
  run_step speed "${SUITE_SPEED_TIMEOUT:-200}" "$PY" bench/speed_ratio.py --device "$DEVICE" \
    ${SUITE_SPEED_ARGS:---model wrn-28-10 --batch-size 256 --rounds 5 --steps 3 --optimizers sgd,nag,sam,msam,msam-overlap} \
    --out "$OUT/speed-ratio-wrn.json"
fi

if wants vit; then
  # shellcheck disable=SC2086
  run_step vit "${SUITE_VIT_TIMEOUT:-120}" "$PY" bench/speed_ratio.py --device "$DEVICE" \
    ${SUITE_VIT_ARGS:---model vit-s32 --amp bf16 --batch-size 256 --rounds 5 --steps 3} \
    --out "$OUT/speed-ratio-vit.json"
fi

if wants torchrun; then
  # One process per visible GPU; its JSON stays out of $OUT (8 files at most), its table is in the log.
  nproc_gpu=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)
  # shellcheck disable=SC2086
  run_step torchrun "${SUITE_TORCHRUN_TIMEOUT:-120}" "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node "$nproc_gpu" bench/speed_ratio.py --device "$DEVICE" \
    ${SUITE_TORCHRUN_ARGS:---model wrn-16-4 --batch-size 128 --rounds 5} \
    --out "$(mktemp -d)/speed-ratio-ddp.json"
fi

write_summary
echo "suite done: $SUMMARY"
