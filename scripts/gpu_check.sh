#!/usr/bin/env bash
# GPU check (a few minutes): first losses CPU vs CUDA, then two tiny tasks through the real
# scripts on CUDA, fp32 and bf16, and evaluate.py on the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python scripts/gpu_check.py
tmp=$(mktemp -d)
python prepare_data.py synthetic --out "$tmp/data" --users 2000 --items 300 --seq_len 30 --tasks 2
for amp in fp32 bf16; do
  python train_task1.py --dataset "$tmp/data/tasks.json" --savepath "$tmp/$amp/task1" --epochs 2 --device cuda --amp $amp --quiet
  python train_teracon_t2.py --dataset "$tmp/data/tasks.json" --savepath "$tmp/$amp/task2" --paths "$tmp/$amp/task1.pt" \
    --epochs 3 --batch 256 --device cuda --amp $amp --quiet
  python evaluate.py --paths "$tmp/$amp/task2.pt" --device cuda
done
