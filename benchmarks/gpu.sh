#!/usr/bin/env bash
# A short check on one lent GPU (e.g. H100): two Beauty pretraining epochs each at bf16 ZeRO 2
# (NCCL) and fp32 ZeRO 0 at fixed shapes compiled into CUDA graphs (pretrain.static_shapes,
# pretrain.compile), then fp32 ZeRO 0 eager, a short fine-tune, the step comparison of
# benchmarks/train_speed.py (plain PyTorch vs DeepSpeed: ms, ATen operators and device syncs per
# step), and the eager step's launch-free floor (benchmarks/graph_step.py).
#
#   bash benchmarks/gpu.sh BEAUTY [OUT [COPY_TO]]
#
# BEAUTY: a prepared dataset folder (s3rec-prep output) or the release folder with Beauty.txt and
# Beauty_item2attributes.json (prepared here first). Only the repository travels to the GPU
# machine: pass the data along with it. Writes OUT/gpu.json (default OUT=bench-results/gpu),
# updated after every part, so a run cut short still leaves what it measured; COPY_TO, if given,
# receives a copy of gpu.json, the profile tables and each part's log (OUT/part-NAME.log) after
# every part (runs stay in OUT). gpu.json's cudagraph_skip_lines counts, for each compiled part, the
# lines where inductor says it could not use a CUDA graph (0: the figure is a CUDA-graph one).
# On a lent machine (the repository travels, plus wheels and data in git-ignored .whl/ .gpu/):
#   pip install -q --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash benchmarks/gpu.sh .gpu/beauty /tmp/g $OUT > $OUT/gpu.log 2>&1
#
# Why fp32 ZeRO 0 as well as the issue's bf16 ZeRO 2: this 0.9M-parameter model's step is bound by the host launching kernels,
# not by arithmetic. On an H100 (commit a81ca1b) a DeepSpeed step took 13.5 ms at fp32 ZeRO 0 and
# 24.2 ms at bf16 ZeRO 2 (plain PyTorch 11.6-12.3 ms), and an epoch 28.7 s against 37.6 s: bf16 and
# ZeRO add kernels and buy nothing at this size. torch.compile of the loss with the batches' own
# shapes was slower still (56.9 s for its second epoch: every new shape compiles); hence fixed
# shapes (s3rec/static_objectives.py), under which one graph serves every step.
set -o pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benchmarks/gpu.sh BEAUTY_DATASET_OR_RELEASE_DIR [OUT]}
OUT=${2:-bench-results/gpu}
COPY_TO=${3:-}
mkdir -p "$OUT" ${COPY_TO:+"$COPY_TO"} || exit 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# GPU_SH_ON_CPU=1: run every part on the CPU (tests/test_benchmarks.py checks each command there
# before a lent machine's minutes are spent on it; the figures then mean nothing), with
# GPU_SH_EXTRA="key=value ..." appended to every command (there: a tiny model)
X=${GPU_SH_EXTRA:-}
if [ "${GPU_SH_ON_CPU:-0}" != 1 ]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 2
fi

if [ ! -f "$DATA/manifest.json" ]; then
  if [ -f "$DATA/Beauty.txt" ]; then
    python -m s3rec.data_prep.cli release --src "$DATA" --name Beauty --out "$OUT/beauty"
    DATA="$OUT/beauty"
  else
    echo "$DATA: neither a prepared dataset (manifest.json) nor a release folder (Beauty.txt)" >&2
    exit 2
  fi
fi

summary() {  # gather every part finished so far into OUT/gpu.json
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = Path(sys.argv[1])
def epochs(run):
    a = EventAccumulator(str(run), size_guidance={"scalars": 0}); a.Reload()
    return [round(s.value, 2) for s in a.Scalars("perf/epoch_s")] if "perf/epoch_s" in a.Tags()["scalars"] else []
res = {"epoch_s": {p.name: epochs(p) for p in sorted(out.iterdir()) if (p / "run.json").exists()},
       "steps": {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("step_*.json"))}}
# inductor logs, and goes on, where it cannot use a CUDA graph: the compiled parts' figures are
# CUDA-graph figures only where this count is 0
pat = re.compile(r"skipping cudagraphs|disabling cudagraphs|cudagraph partition", re.I)
res["cudagraph_skip_lines"] = {p.stem: sum(1 for l in p.read_text(errors="replace").splitlines()
                                          if pat.search(l)) for p in sorted(out.glob("part-*.log"))
                               if "static" in p.stem}
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
[ -z "$COPY_TO" ] || cp "$OUT/gpu.json" "$OUT"/*.txt "$OUT"/part-*.log "$COPY_TO"/ 2>/dev/null || true
}

part() {  # part NAME SECONDS CMD...: output into OUT/part-NAME.log (then shown); a part that
  # fails or overruns is reported, and the rest still run. -k: a process stuck where its SIGTERM
  # handler cannot run (an NCCL or CUDA hang) is killed 20 s later, not left to eat the machine.
  local name=$1 limit=$2; shift 2
  local rc=0
  echo "gpu.sh: part $name (limit ${limit}s): $*"
  timeout -k 20 "$limit" "$@" > "$OUT/part-$name.log" 2>&1 || rc=$?
  cat "$OUT/part-$name.log"
  if [ "$rc" != 0 ]; then
    echo "gpu.sh: part $name failed or ran past ${limit}s (exit $rc)" >&2
    FAILED=$((FAILED + 1))
  fi
  summary
  return $rc
}
FAILED=0

FAST="deepspeed.precision=fp32 deepspeed.zero_stage=0 logging.every_steps=100"
STATIC="pretrain.static_shapes=true pretrain.compile=reduce-overhead"
EPOCHS="pretrain.epochs=2 pretrain.save_epochs=[]"   # epoch 1 warms up (compiles); epoch 2 is the figure
WARM_PROFILE="logging.profile_steps=[600,630]"     # in epoch 1: epoch 2's time stays unprofiled
# Parts in order of what they tell, each time-limited: a lent machine gives one command of at
# most ~9 minutes after its start, so the issue's figure comes first.
compiled_part() {  # compiled_part NAME LIMIT KEY=VALUE...: two epochs at fixed shapes in CUDA
  # graphs, steps 600-629 of epoch 1 (compiled by then) profiled into OUT/profile_NAME.txt: what
  # is left around the graphs. If that run fails, the compiled step without CUDA graphs (fused
  # kernels, still launched one by one): NAME_nograph
  local name=$1 limit=$2; shift 2
  if ! TORCH_LOGS=perf_hints part "$name" "$limit" python -m s3rec.pretrain --data "$DATA" \
      --out "$OUT/pretrain_$name" --config configs/beauty.yaml $EPOCHS "$@" $STATIC $WARM_PROFILE $X; then
    part "${name}_nograph" 120 python -m s3rec.pretrain --data "$DATA" --out "$OUT/pretrain_${name}_nograph" \
      --config configs/beauty.yaml $EPOCHS "$@" $STATIC pretrain.compile=default $X
  fi
  cp "$OUT/pretrain_$name/profile/steps-600-630.rank0.txt" "$OUT/profile_$name.txt" || true
}
# 1. the issue's configuration: bf16, ZeRO 2 (NCCL), fixed shapes compiled and replayed as CUDA
#    graphs (OUT/pretrain_static_bf16_zero2)
compiled_part static_bf16_zero2 200 logging.every_steps=100 deepspeed.precision=bf16 \
  deepspeed.zero_stage=2
# 2. the same at fp32 ZeRO 0 (OUT/pretrain_static)
compiled_part static 170 $FAST
# 3. two Beauty pretraining epochs, fp32 ZeRO 0, the default (eager) step; steps 300-329 profiled:
#    where the time outside the bare step goes (OUT/profile_fp32_zero0.txt)
part pretrain 110 python -m s3rec.pretrain --data "$DATA" --out "$OUT/pretrain" --config configs/beauty.yaml \
  $EPOCHS $FAST logging.profile_steps=[300,330] $X
cp "$OUT"/pretrain/profile/steps-300-330.rank0.txt "$OUT/profile_fp32_zero0.txt" || true
# 4. a short fine-tune from part 3's model
part finetune 60 python -m s3rec.finetune --data "$DATA" --out "$OUT/finetune" --config configs/beauty.yaml \
  --init "$OUT/pretrain/final.pt" finetune.epochs=2 $FAST $X
# 5. ms, ATen operators and device syncs per step: plain PyTorch vs DeepSpeed, eager and compiled
for v in fp32:0 bf16:2; do
  part "step_${v/:/_zero}" 100 python benchmarks/train_speed.py --data "$DATA" --json "$OUT/step_${v/:/_zero}.json" \
    --overhead-only --overhead-steps 300 deepspeed.precision=${v%:*} deepspeed.zero_stage=${v#*:} $X
done
part step_static 150 python benchmarks/train_speed.py --data "$DATA" --json "$OUT/step_fp32_zero0_static.json" \
  --overhead-only --overhead-steps 300 $STATIC $X
# 6. the floor of the eager step: its launches captured in one CUDA graph (graph_step.py)
part graph_step 120 python benchmarks/graph_step.py --data "$DATA" --json "$OUT/graph_step.json" $X
[ "$FAILED" = 0 ] || { echo "gpu.sh: $FAILED part(s) failed (above)" >&2; exit 1; }
