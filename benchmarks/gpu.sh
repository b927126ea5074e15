#!/usr/bin/env bash
# A short check on one lent GPU (e.g. H100): NCCL, one Beauty pretraining epoch at fp32 ZeRO 0 and
# one at bf16 ZeRO 2, a short fine-tune, a step's launch-free floor (benchmarks/graph_step.py: the
# step in a CUDA graph), then the step comparison of benchmarks/train_speed.py (plain PyTorch vs
# DeepSpeed: ms, ATen operators and device syncs per step).
#
#   bash benchmarks/gpu.sh BEAUTY [OUT]
#
# BEAUTY: a prepared dataset folder (s3rec-prep output) or the release folder with Beauty.txt and
# Beauty_item2attributes.json (prepared here first). Only the repository travels to the GPU
# machine: pass the data along with it. Writes OUT/gpu.json (default OUT=bench-results/gpu),
# updated after every part, so a run cut short still leaves what it measured.
# On a lent machine (the repository travels, plus wheels and data in git-ignored .whl/ .gpu/):
#   pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash benchmarks/gpu.sh .gpu/beauty /tmp/g > $OUT/gpu.log 2>&1; cp /tmp/g/gpu.json /tmp/g/*.txt $OUT/
#
# Why fp32 ZeRO 0 first: this 0.9M-parameter model's step is bound by the host launching kernels,
# not by arithmetic. On an H100 (session 4) a DeepSpeed step took 13.5 ms at fp32 ZeRO 0 and
# 24.2 ms at bf16 ZeRO 2 (plain PyTorch 12.1 ms), and an epoch 28.7 s against 37.6 s: bf16 and
# ZeRO add kernels and buy nothing at this size. torch.compile of the loss (dynamic shapes) was
# slower still: 56.9 s for its second epoch.
set -o pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benchmarks/gpu.sh BEAUTY_DATASET_OR_RELEASE_DIR [OUT]}
OUT=${2:-bench-results/gpu}
mkdir -p "$OUT" || exit 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2

if [ ! -f "$DATA/manifest.json" ]; then
  if [ -f "$DATA/Beauty.txt" ]; then
    python -m data_prep.cli release --src "$DATA" --name Beauty --out "$OUT/beauty"
    DATA="$OUT/beauty"
  else
    echo "$DATA: neither a prepared dataset (manifest.json) nor a release folder (Beauty.txt)" >&2
    exit 2
  fi
fi

summary() {  # gather every part finished so far into OUT/gpu.json
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = Path(sys.argv[1])
def epochs(run):
    a = EventAccumulator(str(run), size_guidance={"scalars": 0}); a.Reload()
    return [round(s.value, 2) for s in a.Scalars("perf/epoch_s")] if "perf/epoch_s" in a.Tags()["scalars"] else []
res = {"epoch_s": {p.name: epochs(p) for p in sorted(out.iterdir()) if (p / "run.json").exists()},
       "steps": {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("step_*.json"))}}
r = out / "finetune/results.json"
if r.exists():
    res["finetune_results"] = json.loads(r.read_text())
g = out / "graph_step.json"
if g.exists():
    res["graph_step"] = json.loads(g.read_text())
tmp = out / "gpu.json.tmp"
tmp.write_text(json.dumps(res, indent=2) + "\n"); tmp.replace(out / "gpu.json")
print(json.dumps(res["epoch_s"]), {k: round(v["deepspeed_step_ms"], 2) for k, v in res["steps"].items()})
PY
}

part() {  # part SECONDS CMD...: a part that fails or overruns is reported, and the rest still run
  local limit=$1; shift
  timeout "$limit" "$@" || echo "gpu.sh: part failed or ran past ${limit}s (exit $?): $*" >&2
  summary
}

FAST="deepspeed.precision=fp32 deepspeed.zero_stage=0 logging.every_steps=100"
# 1. one pretraining epoch at fp32 ZeRO 0, then at bf16 ZeRO 2 (NCCL, bf16)
#    (steps 300-329 profiled: where the time outside the bare step goes, OUT/profile_fp32_zero0.txt)
part 150 python -m s3rec.pretrain --data "$DATA" --out "$OUT/pretrain" --config configs/beauty.yaml \
  pretrain.epochs=1 pretrain.save_epochs=[] $FAST logging.profile_steps=[300,330]
cp "$OUT"/pretrain/profile/steps-300-330.rank0.txt "$OUT/profile_fp32_zero0.txt" || true
part 150 python -m s3rec.pretrain --data "$DATA" --out "$OUT/pretrain_bf16_zero2" \
  --config configs/beauty.yaml pretrain.epochs=1 pretrain.save_epochs=[] logging.every_steps=100 \
  deepspeed.precision=bf16 deepspeed.zero_stage=2
# 2. a short fine-tune from it
part 120 python -m s3rec.finetune --data "$DATA" --out "$OUT/finetune" --config configs/beauty.yaml \
  --init "$OUT/pretrain/final.pt" finetune.epochs=3 $FAST
# 3. the floor: one step's device time, its launches captured in a CUDA graph (graph_step.py)
part 120 python benchmarks/graph_step.py --data "$DATA" --json "$OUT/graph_step.json"
# 4. ms, ATen operators and device syncs per step: plain PyTorch vs DeepSpeed
for v in fp32:0 bf16:2 fp16:2; do
  part 100 python benchmarks/train_speed.py --data "$DATA" --json "$OUT/step_${v/:/_zero}.json" \
    --overhead-only --overhead-steps 300 deepspeed.precision=${v%:*} deepspeed.zero_stage=${v#*:}
done
