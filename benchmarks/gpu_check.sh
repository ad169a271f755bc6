#!/usr/bin/env bash
# One-shot GPU check of the Triton cross-attention: the GPU tests, then the kernel benchmark, in one call.
#
# usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (CUDA machine, from any folder; OUT_DIR defaults to $OUT, else
#                                                benchmarks/results)
#
# Writes OUT_DIR/gpu.txt (card, driver, versions), gpu_tests.log, kernels.log and kernels.json (copy that to
# benchmarks/results/kernels.json with the date and card). Sized to finish inside one 10-minute device call:
# tests up to 200 s, benchmark up to 330 s. Both parts always run; the last line says "gpu_check: OK" or
# "gpu_check: FAILED: <parts>", and the exit status is 1 if either part fails (a test, a crashed benchmark backend,
# a timeout), 2 without a GPU.
set -uo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
out=${1:-${OUT:-}}
[ -n "$out" ] && out=$(realpath -m -- "$out")  # before the cd: a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.." || exit 2  # the repository root
out=${out:-$PWD/benchmarks/results}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! command -v nvidia-smi >/dev/null || ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here; this script is for a GPU machine" >&2
    exit 2
fi
mkdir -p "$out"
# mmscale.kernels is the kernels/xattn/ folder, mapped into the package by setup.py. Without installing anything
# (the GPU machine has no network), lay the package out in a temporary folder of links instead.
site=$(mktemp -d)
mkdir "$site/mmscale"
for f in "$PWD"/mmscale/*; do ln -s "$f" "$site/mmscale/"; done
ln -s "$PWD/kernels/xattn" "$site/mmscale/kernels"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
$py -c "import mmscale.kernels" || { echo "gpu_check: FAILED: mmscale.kernels does not import"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
    $py -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
    date -u +%Y-%m-%dT%H:%M:%SZ
} | tee "$out/gpu.txt"

# pipefail: a pipeline's status is the python's (or timeout's 124), not tee's 0.
failed=()
timeout 200 $py -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$out/gpu_tests.log" \
    || failed+=("GPU tests (exit ${PIPESTATUS[0]}, see gpu_tests.log)")
timeout 330 $py benchmarks/xattn_kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" \
    || failed+=("benchmark (exit ${PIPESTATUS[0]}, see kernels.log)")
if ((${#failed[@]})); then
    printf -v parts '%s; ' "${failed[@]}"
    echo "gpu_check: FAILED: ${parts%; }"
    exit 1
fi
echo "gpu_check: OK (GPU tests passed, every benchmark backend ran or was skipped as unavailable)"
