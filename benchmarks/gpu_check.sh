#!/usr/bin/env bash
# One prepared check of the GPU paths on a lent H100/H200 (no internet there), from the repository root:
#     bash benchmarks/gpu_check.sh
# It runs, each under its own time limit (about 6 minutes in all):
#   1. the imports the project needs (faiss, utm, pytorch-metric-learning and kornia are not on the GPU
#      machines' image: they travel as wheels in .whl/, installed here into /tmp/site);
#   2. benchmarks/gpu_checks.py: AMP fp16/bf16 training steps, augmentation and nvJPEG decoding on the GPU
#      against the CPU, channels_last;
#   3. benchmarks/bench.py on CUDA with 2 loader workers (the notebook case), ours against naive;
#   4. a tiny train.py run (--amp bf16 --channels_last, then --decode_on_gpu) and eval.py of its best model
#      (hnsw index, descriptor cache written then read).
# Results go to $OUT (default ./gpu_check_out): summary.txt (the table printed last), checks.json,
# bench.json and gpu_check.log (all the output).
# The wheels, downloaded once on a machine with pip access (Python 3.12 on the GPU machines):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 utm==0.9.0 pytorch-metric-learning==2.9.0 \
#         kornia==0.9.0 kornia_rs==0.2.0
# and the device run carries them: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
# Dry run on a machine without GPU: GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh (CUDA-only checks are
# skipped, the benchmark and the runs are shrunk).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1
: > "$SUMMARY"
: > "$LOG"

record() {  # record NAME STATUS DETAIL
    printf '%-34s %-8s %s\n' "$1" "$2" "$3" >> "$SUMMARY"
}

run_step() {  # run_step NAME SECONDS COMMAND...: the step's output goes to the log, its status to the summary
    local name=$1 seconds=$2 start status
    shift 2
    start=$(date +%s)
    echo "===== $name: $*" >> "$LOG"
    timeout "$seconds" "$@" >> "$LOG" 2>&1
    status=$?
    local elapsed=$(( $(date +%s) - start ))
    if [ $status -eq 0 ]; then record "$name" ok "${elapsed} s"
    elif [ $status -eq 124 ]; then record "$name" TIMEOUT "over ${seconds} s"
    else record "$name" FAIL "exit $status after ${elapsed} s (see gpu_check.log)"; fi
    return $status
}

#### 1. Packages: wheels only for what is missing (a dry run here keeps the local packages)
MISSING=$(python3 -c "
import importlib.util
print(' '.join(m for m in ('faiss', 'utm', 'pytorch_metric_learning', 'kornia', 'sklearn', 'timm', 'matplotlib',
                           'tqdm', 'PIL', 'scipy') if importlib.util.find_spec(m) is None))")
if [ -n "$MISSING" ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
run_step "imports (missing: ${MISSING:-none})" 120 python3 -c "
import faiss, utm, pytorch_metric_learning, kornia, sklearn, timm, matplotlib, tqdm, torch, torchvision
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'faiss', faiss.__version__,
      'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')
" || true
nvidia-smi -L >> "$LOG" 2>&1 || true

#### 2. GPU code paths against their references
run_step "GPU checks (gpu_checks.py)" 150 python3 benchmarks/gpu_checks.py --device "$DEVICE" --out "$OUT/checks.json"
if [ -f "$OUT/checks.json" ]; then
    python3 -c "
import json
for row in json.load(open('$OUT/checks.json'))['checks']:
    print(f\"  {row['check']:<32} {row['status']:<8} {row['detail']}\")" >> "$SUMMARY"
fi

#### 3. The benchmark, ours against naive, 2 loader workers
if [ "$DEVICE" = cpu ]; then BENCH_SIZE="--iterations 2 --train_iterations 2 --retrieval_database 2000 --sections input train"
else BENCH_SIZE="--iterations 20 --train_iterations 20"; fi
run_step "benchmark (bench.py)" 300 python3 benchmarks/bench.py --device "$DEVICE" --num_workers 2 $BENCH_SIZE \
    --out "$OUT/bench.json"
if [ -f "$OUT/bench.json" ]; then
    python3 -c "
import json
bench = json.load(open('$OUT/bench.json'))
print(bench['machine'])
print(bench['table'])
results = bench['results']
ours, naive = results['train:ours']['images_per_s'], results['train:naive']['images_per_s']
print(f\"  training images/s: ours {ours:.0f}, naive {naive:.0f}: {ours / naive:.1f}x (target >= 3x)\")
gpu = results.get('train:ours_gpu_decode')
if gpu:
    print(f\"  training images/s with --decode_on_gpu: {gpu['images_per_s']:.0f}\")" >> "$SUMMARY"
fi

#### 4. A tiny end-to-end run on the device
ITERATIONS=$([ "$DEVICE" = cpu ] && echo 3 || echo 30)
python3 -c "from datasets.synthetic import generate_dataset as g; g('$WORK/data', train_places=40, val_places=12,
    test_places=12, images_per_train_place=10, view_size=96, seed=0)" >> "$LOG" 2>&1
TRAIN_FLAGS=(--dataset_folder "$WORK/data" --groups_num 1 --epochs_num 2 --iterations_per_epoch "$ITERATIONS"
             --batch_size 16 --image_size 96 --pretrained none --num_workers 2 --device "$DEVICE"
             --logs_root "$WORK/logs" --cache_folder "$WORK/cache")
run_step "train.py --amp bf16 --channels_last" 120 python3 train.py "${TRAIN_FLAGS[@]}" --amp bf16 --channels_last \
    --save_dir amp
run_step "train.py --decode_on_gpu" 120 python3 train.py "${TRAIN_FLAGS[@]}" --amp bf16 --decode_on_gpu \
    --preresize_cache "$WORK/preresized" --image_size 64 --save_dir decode
BEST=$(ls "$WORK"/logs/amp/*/best_model.pth 2>/dev/null | head -1)
EVAL_FLAGS=(--dataset_folder "$WORK/data" --pretrained none --num_workers 2 --device "$DEVICE" --eval_amp bf16
            --resume_model "$BEST" --logs_root "$WORK/logs" --faiss_index hnsw --descriptors_cache "$WORK/descriptors")
run_step "eval.py (hnsw, cache written)" 90 python3 eval.py "${EVAL_FLAGS[@]}"
run_step "eval.py (cache read)" 90 python3 eval.py "${EVAL_FLAGS[@]}"
LAST_EVAL=$(ls -d "$WORK"/logs/default/* 2>/dev/null | tail -1)
grep -h "R@1\|hnsw index\|read from the cache" "$LAST_EVAL/info.log" 2>/dev/null | sed 's/^/  /' | cut -c1-200 \
    >> "$SUMMARY"

rm -rf "$WORK"
echo
echo "===== summary ($DEVICE)"
cat "$SUMMARY"
grep -q "FAIL\|TIMEOUT" "$SUMMARY" && exit 1 || exit 0
