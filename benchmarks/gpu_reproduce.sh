#!/usr/bin/env bash
# The reproduction fine-tunes of docs/reproduction.md on one lent GPU, beside benchmarks/gpu.sh,
# in one call:
#   1. fine-tune from the authors' Beauty-epochs-150.pt (imported), early stopping as the reference;
#   2. fine-tune without pretraining (variant finetune-only, the SASRec-style baseline);
#   3. benchmarks/gpu.sh (NCCL; pretraining epochs timed at bf16 ZeRO 2 and fp32 ZeRO 0, fixed
#      shapes in CUDA graphs and eager; step comparisons; see its header).
# Runs 1-3 concurrently (they are small next to an H100). fp32 for 1 and 2, as the original.
#
#   bash benchmarks/gpu_reproduce.sh BEAUTY_DATASET AUTHORS_CKPT OUT
#
# OUT gets only small files (logs, results JSON); run folders go to a scratch folder.
set -eo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: gpu_reproduce.sh BEAUTY_DATASET AUTHORS_CKPT OUT}
CKPT=${2:?authors checkpoint}
OUT=${3:?out folder}
WORK=${WORK:-/tmp/s3rec-gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt" || true

python -m s3rec.import_original "$CKPT" --data "$DATA" --out "$WORK/authors.pt"
run_ft() {   # name, extra args...
  local name=$1; shift
  python -m s3rec.finetune --data "$DATA" --out "$WORK/$name" --config configs/beauty.yaml "$@" \
    > "$OUT/$name.log" 2>&1 || echo "$name failed: $?" >> "$OUT/$name.log"
  cp "$WORK/$name/results.json" "$OUT/$name-results.json" 2>/dev/null || true
}
run_ft ft-authors --init "$WORK/authors.pt" &
run_ft ft-scratch variant=finetune-only &
bash benchmarks/gpu.sh "$DATA" "$WORK/gpu" > "$OUT/gpu.log" 2>&1 || echo "gpu.sh failed: $?" >> "$OUT/gpu.log"
cp "$WORK/gpu/gpu.json" "$OUT/gpu.json" 2>/dev/null || true
wait
