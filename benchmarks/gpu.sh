#!/usr/bin/env bash
# A short check on one lent GPU (e.g. H100): NCCL, bf16, ZeRO 2; one Beauty pretraining epoch
# timed, then a short fine-tune from it; then the step comparison of benchmarks/train_speed.py
# (plain PyTorch vs DeepSpeed, ms and device syncs per step) for fp32/bf16/fp16 at ZeRO 0 and 2.
#
#   bash benchmarks/gpu.sh BEAUTY [OUT]
#
# BEAUTY: a prepared dataset folder (s3rec-prep output) or the release folder with Beauty.txt and
# Beauty_item2attributes.json (prepared here first). Only the repository travels to the GPU
# machine: pass the data along with it. Writes OUT/gpu.json (default OUT=bench-results/gpu).
set -eo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benchmarks/gpu.sh BEAUTY_DATASET_OR_RELEASE_DIR [OUT]}
OUT=${2:-bench-results/gpu}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

if [ ! -f "$DATA/manifest.json" ]; then
  if [ -f "$DATA/Beauty.txt" ]; then
    python -m data_prep.cli release --src "$DATA" --name Beauty --out "$OUT/beauty"
    DATA="$OUT/beauty"
  else
    echo "$DATA: neither a prepared dataset (manifest.json) nor a release folder (Beauty.txt)" >&2
    exit 2
  fi
fi

GPU="deepspeed.precision=bf16 deepspeed.zero_stage=2 logging.every_steps=100"
t0=$(date +%s.%N)
python -m s3rec.pretrain --data "$DATA" --out "$OUT/pretrain" --config configs/beauty.yaml \
  pretrain.epochs=1 pretrain.save_epochs=[] $GPU
t1=$(date +%s.%N)
python -m s3rec.finetune --data "$DATA" --out "$OUT/finetune" --config configs/beauty.yaml \
  --init "$OUT/pretrain/final.pt" finetune.epochs=3 $GPU
t2=$(date +%s.%N)
for v in fp32:0 bf16:0 bf16:2 fp16:2; do
  python benchmarks/train_speed.py --data "$DATA" --json "$OUT/step_${v/:/_zero}.json" \
    --overhead-only --overhead-steps 300 deepspeed.precision=${v%:*} deepspeed.zero_stage=${v#*:}
done
# what DeepSpeed's per-step bf16 inf/NaN test costs (off by default: deepspeed.bf16_skip_nonfinite)
python benchmarks/train_speed.py --data "$DATA" --json "$OUT/step_bf16_zero2_skipcheck.json" \
  --overhead-only --overhead-steps 300 deepspeed.precision=bf16 deepspeed.zero_stage=2 \
  deepspeed.bf16_skip_nonfinite=true
python - "$OUT" "$t0" "$t1" "$t2" <<'PY'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
def last(run, tag):
    a = EventAccumulator(str(Path(out) / run), size_guidance={"scalars": 0}); a.Reload()
    return a.Scalars(tag)[-1].value
res = {"pretrain_wall_s": t1 - t0, "pretrain_epoch_s": last("pretrain", "perf/epoch_s"),
       "finetune_wall_s": t2 - t1, "finetune_epoch_s": last("finetune", "perf/epoch_s"),
       "finetune_results": json.loads((Path(out) / "finetune/results.json").read_text()),
       "steps": {p.stem: json.loads(p.read_text()) for p in sorted(Path(out).glob("step_*.json"))}}
(Path(out) / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
PY
