#!/usr/bin/env bash
# Every CUDA figure of docs/benchmarks.md §4 in one prepared run of at most 8 minutes of wall time.
#
#   bash bench/gpu.sh all                                # on the GPU machine
#   DEVICE=cpu TINY=1 RESULTS=/tmp/dry bash bench/gpu.sh all   # dry run on a CPU: same commands, tiny sizes
#
# Four stages, in this order, each under its own `timeout` and writing its figures to $RESULTS as it
# goes, so a run cut short still returns what it measured:
#   1. tests       pytest -m cuda (tests/test_cuda.py)                                     ~1 min
#   2. throughput  VGG-11-BN bf16-mixed batch 128, bnlightning vs the hand loop (100 timed steps,
#                  3 repeats) + the on-device loader vs DataLoader                        ~2 min
#   3. cost        one measurement of each callback in training steps on VGG-16-BN, and the overhead
#                  with max_overhead=0.1                                                   ~2 min
#   4. paper       configs/vgg_bn.yaml + configs/measure.yaml on fake CIFAR-10, 1,500 steps  ~2 min
# A figure that misses its target gets a torch.profiler trace of a few steps (bench/profile_steps.py)
# in the same stage. $RESULTS/summary.txt gathers the one-line result of every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${RESULTS:-bench/gpu-results}
mkdir -p "$results"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
tiny=${TINY:-0}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 WANDB_MODE=offline WANDB_SILENT=true
summary="$results/summary.txt"
started=$(date +%s)

say() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$summary"; }
# run NAME SECONDS CMD...: one stage command under its own timeout, its output in $results/NAME.log
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$results/$name.log" 2>&1
    local rc=$?
    say "$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)"
    return $rc
}
# missed FILE.json PYTHON-EXPR: true if the figure read from the JSON misses its target
missed() {
    [ -f "$1" ] || return 0
    $py -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if ($2) else 1)" "$1"
}

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (device $device)"
    $py -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.version.cuda)"
} | tee "$results/gpu.txt" | tee -a "$summary"

if [ "$tiny" = 1 ]; then
    width=0.0625 bs=16 steps=4 warmup=1 repeats=2 paper_steps=20 n_train=400 n_test=100 precision=32-true
    probe="--probe-width 0.0625 --probe-batch-size 16 --probe-measurements 2" cost_steps=20 cost_every=10
    paper_extra="--model.init_args.width 0.0625 --data.init_args.batch_size 16"
    cost_models="vgg11-bn"
else
    width=1.0 bs=128 steps=100 warmup=10 repeats=3 paper_steps=1500 n_train=50000 n_test=10000 precision=bf16-mixed
    probe="--probe-width 1.0 --probe-batch-size 128 --probe-measurements 3" cost_steps=200 cost_every=100 paper_extra=""
    cost_models="vgg16-bn"
fi

# 1. the CUDA tests (skipped, not failed, on a CPU)
run tests ${T_TESTS:-75} $py -m pytest -m cuda -q -rA -p no:cacheprovider tests/test_cuda.py
tail -5 "$results/tests.log" | tee -a "$summary"

# 2. throughput: bnlightning vs the hand loop, and the two data paths
run throughput ${T_THROUGHPUT:-150} $py bench/throughput.py --device "$device" --precisions "$precision" --batch-sizes "$bs" \
    --width "$width" --steps "$steps" --warmup "$warmup" --repeats "$repeats" --out "$results/throughput.json"
grep -E "worst|ratio" "$results/throughput.log" | tail -2 | tee -a "$summary"
# targets: >= 25,000 images/s on the GPU, bnlightning / hand loop >= 0.9, on-device >= 3x DataLoader
if missed "$results/throughput.json" "min(p['bnlightning_images_per_s'] for p in r['parity']) < 25000 or r['worst_ratio'] < 0.9"; then
    say "throughput missed a target: profiling 5 steps"
    run profile-throughput ${T_PROFILE:-40} $py bench/profile_steps.py --device "$device" --precision "$precision" \
        --width "$width" --batch-size "$bs" --warmup 3 --steps 5 --trace-dir "$results/profile-throughput"
fi

# 3. cost of one measurement of each callback (training steps) on VGG-16-BN, and the overhead under a budget
if $py bench/cost.py --help 2>/dev/null | grep -q -- "--device"; then
    run cost ${T_COST:-150} $py bench/cost.py --device "$device" --precision "$precision" --models $cost_models --out "$results/cost.json"
else
    run cost ${T_COST:-150} $py bench/overhead.py --device "$device" --precision "$precision" --config D \
        --width "$width" --batch-size "$bs" --steps $cost_steps --every-n-steps $cost_every --repeats 1 $probe --out "$results/cost.json"
fi
grep -iE "cost|overhead" "$results/cost.log" | tail -12 | tee -a "$summary"
if missed "$results/cost.json" "any(v > t for v, t in [(c.get('cost_in_steps', c.get('steps', 0)), {'InternalCovariateShift': 3, 'LossLandscape': 2}.get(c.get('callback'), 1e9)) for c in r.get('costs', [])])"; then
    say "a measurement missed its cost target: profiling 3 steps with every callback measuring"
    run profile-cost ${T_PROFILE:-40} $py bench/profile_steps.py --device "$device" --precision "$precision" --config D \
        --width "$width" --batch-size "$bs" --warmup 2 --steps 3 --callbacks --trace-dir "$results/profile-cost"
fi

# 4. a shortened paper run: VGG-16-BN with the measurement callbacks on fake CIFAR-10
data=$(mktemp -d)
$py -m bnlightning.data.fake "$data" --n-train "$n_train" --n-test "$n_test" >/dev/null
p0=$(date +%s)
run paper ${T_PAPER:-130} $py -m bnlightning fit --config configs/vgg_bn.yaml --config configs/measure.yaml \
    --data.init_args.root "$data" --data.init_args.download false --data.init_args.verify_checksums false \
    --trainer.precision "$precision" --trainer.max_steps "$paper_steps" --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$data/runs" --trainer.accelerator "${device%%:*}" $paper_extra
paper_s=$(( $(date +%s) - p0 ))
say "paper run: $paper_steps steps in ${paper_s}s wall (start-up, validation and measurements included); \
extrapolated to 15,000 steps: $(( paper_s * 15000 / paper_steps ))s (an upper bound: start-up counted ${paper_steps}/15000 times over)"
grep -iE "fit done|diverged|Error" "$results/paper.log" | tail -3 | tee -a "$summary"
rm -rf "$data"

say "all stages done in $(( $(date +%s) - started ))s"
