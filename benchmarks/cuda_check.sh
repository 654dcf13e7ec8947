#!/usr/bin/env bash
# The CUDA paths, in one run on a GPU machine (docs/training.md "On a GPU"): training throughput of the
# full-size student and teacher in fp32 and bf16, eager inference in fp32 and bf16 with bf16's error, a bf16
# pre-training run of the demo teacher through the CLI, and the quick demo end to end (device auto -> cuda).
#
#     bash benchmarks/cuda_check.sh OUT_FOLDER     # each step's output lands in OUT_FOLDER/*.txt
#
# Runs from a checkout without installing (PYTHONPATH=src), so a machine whose image already holds torch and the
# dependencies needs nothing else.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda_check.sh OUT_FOLDER}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on whatever it returns
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local began=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - began)) s"; tail -n 14 "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
step train 130 python3 benchmarks/train_throughput.py --device cuda --presets mobilebert ib-bert-large \
    --batch 64 --steps 10 --warmup 3 --precision fp32 bf16
step inference 70 python3 benchmarks/inference_throughput.py --device cuda --preset mobilebert --batch 1 256
step pretrain-bf16 90 python3 -m mobilebert pretrain --config configs/demo/teacher.yaml --out "$work/teacher" \
    --train.precision bf16 --train.steps 300
step demo-quick 150 python3 -m mobilebert demo --quick --out "$work/demo"
step inference-compiled 150 python3 benchmarks/inference_throughput.py --device cuda --preset mobilebert \
    --batch 1 256 --compile
rm -rf "$work"
