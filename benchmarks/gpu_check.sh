#!/usr/bin/env bash
# Every CUDA path of eqprop in one call, for the first machine with a GPU (at most ~8 minutes):
#   bash benchmarks/gpu_check.sh [OUT]          (default OUT=gpu_check; PY=.venv/bin/python)
# 1. environment (nvidia-smi, torch, cuDNN);  2. the CUDA tests of the suite (pytest -m cuda;
#    compiled sweeps against eager ones among them);
# 3. synthetic CIFAR-10 files; a 2-epoch run of the 3-block L=6 config on them with bfloat16
#    relaxations, stopped after epoch 1 and resumed (checkpoints on the GPU);
# 4. benchmarks: the device's peak, relaxation throughput (eager, channels_last, bfloat16, CUDA
#    graphs checked against eager sweeps) and training-step time and memory of the 3-block L=6
#    model at batch 256.
# Each step's exit status and time go to OUT/summary.txt; a failing step does not stop the rest.
set -u
OUT=${1:-gpu_check}
PY=${PY:-.venv/bin/python}
EQ=${EQ:-.venv/bin/eqprop}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
step tests_cuda 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider
step data 30 "$PY" benchmarks/synthetic_data.py cifar10 "$OUT/data" --per-batch 1024
COMMON=(data_dir="$OUT/data" out_dir="$OUT/run" device=cuda batch_size=256 limit_train=2048 limit_test=512
        relax_dtype=bfloat16 progress=false tensorboard=false)
step train_epoch1 120 "$EQ" train cifar10_split_l6_3blocks "${COMMON[@]}" epochs=1
step train_resume 120 "$EQ" train cifar10_split_l6_3blocks "${COMMON[@]}" epochs=2 --resume
step bench 240 "$PY" benchmarks/run.py --parts peak,step,memory,relax --models L6x3 --memory-models L6x3 \
  --batch 256 --repeats 2 --relax-sweeps 20 --memory-T2 20 --device cuda --out "$OUT/bench" --tag gpu
echo "results under $OUT"
