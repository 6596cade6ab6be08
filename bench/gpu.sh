#!/usr/bin/env bash
# Every CUDA figure of docs/benchmarks.md §4, in stages that each fit a 10-minute slot.
#
#   bash bench/gpu.sh tests        # the CUDA tests (pytest -m cuda), then ruff and the whole suite
#   bash bench/gpu.sh throughput   # bench/throughput.py full mode, + channels_last, + torch.compile
#   bash bench/gpu.sh overhead     # bench/overhead.py on VGG-11 and VGG-16, bf16-mixed
#   bash bench/gpu.sh paper        # configs/vgg_bn.yaml (15,000 steps) + configs/measure.yaml on fake CIFAR-10
#   bash bench/gpu.sh all          # one prepared 8-minute run: bench/gpu_all.sh (every figure of §4, each stage timed out)
#
# Logs and JSON go to $RESULTS (default: bench/gpu-results). Run from the repository root with the
# package installed (pip install -e .[dev]).
set -uo pipefail
stage=${1:?usage: bash bench/gpu.sh tests|throughput|overhead|paper|all}
if [ "$stage" = all ]; then exec bash "$(dirname "$0")/gpu_all.sh"; fi
results=${RESULTS:-bench/gpu-results}
mkdir -p "$results"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 WANDB_MODE=offline WANDB_SILENT=true

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
$py -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$results/gpu.txt"

case $stage in
tests)
    $py -m pytest -m cuda -q -rA tests/test_cuda.py 2>&1 | tee "$results/tests-cuda.log"
    ruff check . 2>&1 | tee "$results/tests-ruff.log"
    # the whole suite, one file per worker (pytest-xdist), so it fits the slot; -rf names every failure
    OMP_NUM_THREADS=1 timeout ${SUITE_TIMEOUT:-300} $py -m pytest -q -p no:cacheprovider -n 12 --dist loadfile -rf 2>&1 > "$results/tests-all.log"
    tail -40 "$results/tests-all.log"
    ;;
throughput)
    $py bench/throughput.py --device cuda --precisions 32-true,bf16-mixed --out "$results/throughput.json" 2>&1 | tee "$results/throughput.log"
    $py bench/throughput.py --device cuda --precisions bf16-mixed --batch-sizes 128 --channels-last --no-data-path \
        --out "$results/throughput-cl.json" 2>&1 | tee "$results/throughput-cl.log"
    $py bench/throughput.py --device cuda --precisions bf16-mixed --batch-sizes 128 --compile --repeats 3 --no-data-path \
        --out "$results/throughput-compile.json" 2>&1 | tee "$results/throughput-compile.log"
    ;;
overhead)
    $py bench/overhead.py --device cuda --precision bf16-mixed --out "$results/overhead-vgg11.json" 2>&1 | tee "$results/overhead-vgg11.log"
    $py bench/overhead.py --device cuda --precision bf16-mixed --config D --repeats 2 --out "$results/overhead-vgg16.json" 2>&1 | tee "$results/overhead-vgg16.log"
    ;;
paper)
    data=$(mktemp -d)
    $py -m bnlightning.data.fake "$data" --n-train 50000 --n-test 10000
    precision=${PRECISION:-bf16-mixed}
    start=$(date +%s)
    $py -m bnlightning fit --config configs/vgg_bn.yaml --config configs/measure.yaml \
        --data.init_args.root "$data" --data.init_args.download false --data.init_args.verify_checksums false --trainer.precision "$precision" \
        --trainer.enable_progress_bar false --trainer.default_root_dir "$data/runs" \
        ${EXTRA:-} 2>&1 | tail -40 | tee "$results/paper-$precision.log"
    echo "paper run ($precision): $(( $(date +%s) - start )) s wall" | tee -a "$results/paper-$precision.log"
    ;;
*)
    echo "unknown stage '$stage': accepted are tests, throughput, overhead, paper, all" >&2
    exit 2
    ;;
esac
