#!/usr/bin/env bash
# One prepared run for a lent GPU machine (one H200: 16 cores), under 10 minutes, setup included:
#   1. the method's claims: `fed-ndif simulate experiment=$EXPERIMENT` (default scarce: 3 sites,
#      3 training subjects each, 8 test subjects) trained with $SEEDS seeds (train.seed and
#      compare.seed = k), one process per seed in parallel, federating in process
#      (simulation.engine=inprocess: the same ServerApp and ClientApps, no Ray), then joined by
#      benchmarks/seed_spread.py: report.md with the headline (seeds inside its intervals),
#      claims.md (headline and per-seed table) and claims.json;
#   2. if time is left, the same with $LONG_FACTOR x the training budget (a GPU-sized budget:
#      do the claims move when the models train longer?), joined the same way;
#   3. if time is left, speed: training throughput, and whole-body denoising (192x192x400, bf16)
#      with the claims run's own Fed-NDIF global checkpoint.
# Every stage is bounded by a deadline ($BUDGET_S seconds from the start); what finished comes
# back: $OUT/gpu.log, claims*.md/json, speed.json, runs.tgz (metrics, configs, reports, logs).
#
# The GPU machine has torch but no MONAI, nibabel, pydicom, hydra or Flower, and no registry:
#   here:   benchmarks/gpu-wheels.sh                      (fills .whl/, git-ignored)
#   there:  run tool, carry [".whl"], command "bash benchmarks/gpu.sh", timeout_s 600
# Dry run of the same path on a CPU (a python with the image's packages, cp311 wheels):
#   PY=3.11 DEST=.whl-3.11 benchmarks/gpu-wheels.sh
#   PYTHON=/tmp/bare/bin/python WHEELS=.whl-3.11 DEVICE=cpu EXPERIMENT=tiny OUT=runs/gpu_dry \
#     bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-runs/gpu}
device=${DEVICE:-cuda}
experiment=${EXPERIMENT:-scarce}
seeds=${SEEDS:-3}
budget=${BUDGET_S:-540}
long_factor=${LONG_FACTOR:-4}
py=${PYTHON:-python3}
mkdir -p "$out"
work=${WORK:-/tmp/fed-ndif-gpu}
rm -rf "$work"; mkdir -p "$work"
log="$out/gpu.log"
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }
stamp() { while IFS= read -r line; do echo "$(( $(date +%s) - start )) $line"; done; }
learned=local,fedavg_unet,fedavg_no_nstd,fedndif_global,fedndif_personalized,pooled
left() { local s=$(( budget - ($(date +%s) - start) )); echo $(( s > 1 ? s : 1 )); }

if ! "$py" -c "import monai, nibabel, pydicom, hydra, flwr" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fed-ndif-site "${WHEELS:-.whl}"/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/fed-ndif-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 \
  OMP_NUM_THREADS=${THREADS_PER_SEED:-4} MPLBACKEND=Agg
say "start; device $device; experiment $experiment; seeds $seeds"
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
fi
"$py" -c "import torch, monai, flwr; print('torch', torch.__version__, 'monai', monai.__version__,
'flwr', flwr.__version__)" 2>&1 | tee -a "$log"

# Train and score $seeds seeds of one setting in parallel; then join them. $1: name, rest:
# extra overrides.
claims() {
  local name=$1; shift
  local pids=() k
  mkdir -p "$work/$name"
  for k in $(seq 0 $((seeds - 1))); do
    # The methods that do not train are scored once, in seed 0 (seed_spread.py takes them
    # from there).
    methods=$learned; [ "$k" = 0 ] && methods="input,gaussian,$learned"
    timeout --signal=TERM "$(left)" "$py" -m fed_ndif.cli simulate "experiment=$experiment" \
      "out_dir=$work/$name/seed$k" simulation.engine=inprocess "train.device=$device" \
      "compare.device=$device" logger.wandb_mode=disabled "train.seed=$k" "compare.seed=$k" \
      "compare.methods=[$methods]" "$@" \
      > >(stamp > "$work/$name/seed$k.log") 2>&1 &
    pids+=($!)
  done
  local failed=0
  for k in "${!pids[@]}"; do
    if wait "${pids[$k]}"; then say "$name seed $k: done"
    else say "$name seed $k: FAILED or out of time (rc $?)"; tail -5 "$work/$name/seed$k.log" \
      | tee -a "$log"; failed=1; fi
  done
  [ $failed = 0 ] || return 1
  local folders=()
  for k in $(seq 0 $((seeds - 1))); do folders+=("$work/$name/seed$k"); done
  "$py" benchmarks/seed_spread.py "${folders[@]}" --out "$work/$name/joined" >> "$log" 2>&1 \
    || return 1
  cp "$work/$name/joined/claims.json" "$out/$name.json"
  sed -n '/^## Headline/,/^## All sites/p' "$work/$name/joined/report.md" | sed '$d' \
    > "$out/$name.md"
  sed -n '/^## Training seeds/,/^!\[/p' "$work/$name/joined/report.md" | sed '$d' \
    >> "$out/$name.md"
  say "$name: joined; headline in $out/$name.md"
}

t0=$(date +%s)
if claims claims; then
  base_s=$(( $(date +%s) - t0 ))
  say "claims at the experiment's budget: ${base_s} s"
  # The longer budget trains long_factor x the steps; evaluation is the same, so it needs
  # less than long_factor x the base time: start it only where that fits.
  if [ $(( long_factor * base_s + 60 )) -lt "$(left)" ]; then
    steps=$("$py" - "$experiment" <<'EOF'
import sys
from fed_ndif.config import load_config
cfg = load_config("simulate", [f"experiment={sys.argv[1]}"])
print(int(cfg.fl.local_steps), int(cfg.compare.finetune_steps))
EOF
)
    read -r local_steps finetune_steps <<< "$steps"
    claims claims_long "fl.local_steps=$((long_factor * local_steps))" \
      "compare.finetune_steps=$((long_factor * finetune_steps))" \
      && say "claims at ${long_factor}x budget: done"
  else
    say "no time for the ${long_factor}x budget ($(left) s left)"
  fi
fi

if [ "$(left)" -gt 150 ]; then
  say "speed"
  timeout "$(left)" "$py" benchmarks/train_throughput.py --device "$device" --sizes 64 192 --kinds diffusion unet \
    --model tiny --batch 16 --warmup 3 --steps 20 --repeats 3 --threads 4 \
    --json "$work/train_throughput.json" >> "$log" 2>&1
  checkpoint=$work/claims/seed0/federated/fedndif/checkpoints
  checkpoint=$(ls "$checkpoint"/global-round-*.pt 2>/dev/null | tail -1)
  if [ -n "$checkpoint" ] && [ "$(left)" -gt 60 ]; then
    timeout "$(left)" "$py" benchmarks/denoise_volume.py --work "$work/denoise" \
      --device "$device" --precision bf16 --batch-size 64 --sizes 192x192x400 \
      --use-checkpoint "$checkpoint" --json "$work/denoise.json" >> "$log" 2>&1
  fi
  "$py" - "$work" "$out/speed.json" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
found = {p.stem: json.loads(p.read_text()) for p in
         (work / "train_throughput.json", work / "denoise.json") if p.is_file()}
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
EOF
fi

say "packing"
(cd "$work" && find . \( -name metrics.csv -o -name metrics_seeds.csv -o -name report.md \
  -o -name config.yaml -o -name metrics.jsonl -o -name '*.log' -o -name claims.json \
  -o -name 'selection*.json' -o -name metrics_summary.json \) -not -path '*/sites/*' -print0 \
  | tar czf - --null -T -) > "$out/runs.tgz"
say "end; $(left) s of the budget left"
