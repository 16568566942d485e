#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine with no network, under 9 minutes
# on one H100. It prints the device (nvidia-smi and torch's view), runs the
# `gpu`-marked tests, the targets benchmark (tools/translate_benchmark.py: compute
# per stream-second with 0/1/2/4 caption languages, cascade vs the SED's own rows,
# at most 150 s), then the stream sweep (tools/gpu_sweep.py: Whisper base
# fp16 and the random base-size SED bf16, N = 1..2000 real-time streams,
# compile off and on, within what is left of the 9 minutes), writes
# results/gpu-*.json and prints one table (the targets rows under it).
#
#   bash tools/gpu_check.sh                      # on the CUDA machine
#   bash tools/gpu_check.sh --out-dir /tmp/gpu   # JSON elsewhere
#   bash tools/gpu_check.sh --quick --out-dir D  # CPU, tiny model, ~30 s (the test suite runs it)
#   bash tools/gpu_check.sh -- --streams 1,50    # arguments after -- go to gpu_sweep.py
#
# Exit status: 0; 1 when the gpu tests failed (the sweep still runs and the
# table is printed); the sweep's status when it failed; 3 when no CUDA device
# can be used (a CPU-only torch says so), and then nothing else runs.
# GPU_CHECK_TESTS overrides the test paths (default: tests; --quick: the one
# file holding a gpu test).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

started="$(date +%s)"
budget_s=540
quick=()
out_dir="results"
sweep_args=()
while (($#)); do
  case "$1" in
    --quick) quick=(--quick); shift ;;
    --out-dir) out_dir="$2"; shift 2 ;;
    --out-dir=*) out_dir="${1#*=}"; shift ;;
    --) shift; sweep_args=("$@"); break ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out_dir"

echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
    || echo "nvidia-smi: failed (exit $?)"
else
  echo "nvidia-smi: not found"
fi
probe_rc=0
"$PY" tools/gpu_sweep.py --probe "${quick[@]}" || probe_rc=$?
if [ "$probe_rc" -ne 0 ]; then
  echo "gpu_check: no usable device (above); no test or benchmark was run" >&2
  exit "$probe_rc"
fi

echo "== gpu tests (pytest -m gpu)"
if ((${#quick[@]})); then
  default_tests="tests/engine/test_static_decode.py"
else
  default_tests="tests"
fi
read -r -a tests <<<"${GPU_CHECK_TESTS:-$default_tests}"
tests_rc=0
"$PY" -m pytest -m gpu -q -p no:cacheprovider "${tests[@]}" || tests_rc=$?
case "$tests_rc" in
  0) tests_said="passed" ;;
  5) tests_said="none collected" ;;
  *) tests_said="FAILED (pytest exit $tests_rc)" ;;
esac
echo "gpu tests: $tests_said after $(($(date +%s) - started)) s"

echo "== targets (tools/translate_benchmark.py)"
# Captions in 0/1/2/4 more languages, cascade (random opus-mt-size Marian) against the
# SED's own rows; at most targets_s of the budget (the sweep's shares shrink by what it took).
targets_s=150
if ((${#quick[@]})); then
  target_args=(--quick)
else
  target_args=(--device cuda --dtype bfloat16 --seconds 12)
fi
targets_rc=0
timeout "$targets_s" "$PY" tools/translate_benchmark.py "${target_args[@]}" \
  --out "$out_dir/gpu-translate.json" || targets_rc=$?
echo "targets: exit $targets_rc after $(($(date +%s) - started)) s"

echo "== stream sweep (tools/gpu_sweep.py)"
sweep_rc=0
"$PY" tools/gpu_sweep.py "${quick[@]}" --out-dir "$out_dir" --started-at "$started" \
  --budget-s "$budget_s" --tests-rc "$tests_rc" --targets-json "$out_dir/gpu-translate.json" \
  "${sweep_args[@]}" || sweep_rc=$?

echo "== gpu_check: gpu tests $tests_said; sweep exit $sweep_rc; $(($(date +%s) - started)) s of ${budget_s} s"
if [ "$tests_rc" -ne 0 ] && [ "$tests_rc" -ne 5 ]; then
  exit 1
fi
exit "$sweep_rc"
