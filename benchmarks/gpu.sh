#!/usr/bin/env bash
# One prepared run for a lent GPU machine (one H100 or H200, 16 cores), under 10 minutes, setup
# included:
#   1. the method's three claims at a GPU's size: benchmarks/converge.py with
#      experiment=$EXPERIMENT (default converge_gpu: the converge design with a wider network,
#      batches of 16 and 9 test subjects per site), $SEEDS seeds in parallel, each federating in
#      process (simulation.engine=inprocess: the same ServerApp and ClientApps, no Ray); (a) NSTD
#      embedding at a held-out level and a held-out scanner, (b) federation against local-only
#      and pooled, (c) diffusion (one sample, mean of K) against the FedAvg U-Net on PSNR,
#      lesions and liver noise texture, one Holm family, with the training curves' plateau table;
#   2. speed: training throughput, and whole-body denoising (192x192x400, bf16) with seed 0's
#      Fed-NDIF global checkpoint.
# Writes $OUT/gpu.json (device, times, claims, plateau, speed) and $OUT/gpu.md (the same as
# tables), $OUT/gpu.log, and runs.tgz (metrics, configs, reports, logs). Every stage is bounded
# by a deadline ($BUDGET_S seconds from the start); what finished comes back.
#
# The GPU machine has torch but no MONAI, nibabel, pydicom, hydra or Flower, and no registry:
#   here:   benchmarks/gpu-wheels.sh                      (fills .whl/, git-ignored)
#   there:  run tool, carry [".whl"], command "bash benchmarks/gpu.sh", timeout_s 600
# Dry run of the same path on this CPU, shrunken (BENCHMARKS.md, "GPU run"):
#   DEVICE=cpu OUT=runs/gpu_dry PYTHON=.venv/bin/python THREADS_PER_SEED=1 SEEDS=2 \
#     EXTRA="fl.rounds=1 fl.local_steps=10 compare.finetune_steps=10 compare.val_every=10 ..." \
#     bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-runs/gpu}
device=${DEVICE:-cuda}
experiment=${EXPERIMENT:-converge_gpu}
seeds=${SEEDS:-3}
budget=${BUDGET_S:-540}
speed_s=${SPEED_S:-120}   # kept for stage 2
py=${PYTHON:-python3}
read -r -a extra <<< "${EXTRA:-}"
mkdir -p "$out"
work=${WORK:-/tmp/fed-ndif-gpu}
rm -rf "$work"; mkdir -p "$work"
log="$out/gpu.log"
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }
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

# Stage 1, in its own process group so that the deadline stops the seeds' processes too.
t0=$(date +%s)
setsid "$py" benchmarks/converge.py "$work/claims" --experiment "$experiment" --seeds "$seeds" \
  --parallel "$seeds" "train.device=$device" "compare.device=$device" "${extra[@]}" \
  >> "$log" 2>&1 &
claims_pid=$!
( sleep $(( $(left) > speed_s ? $(left) - speed_s : 1 )); kill -TERM -"$claims_pid" 2>/dev/null ) &
watchdog=$!
if wait "$claims_pid"; then say "claims: done in $(( $(date +%s) - t0 )) s"
else say "claims: FAILED or out of time (rc $?)"; fi
kill "$watchdog" 2>/dev/null
claims_s=$(( $(date +%s) - t0 ))

if [ "$(left)" -gt 60 ]; then
  say "speed"
  timeout "$(left)" "$py" benchmarks/train_throughput.py --device "$device" --sizes 64 192 \
    --kinds diffusion unet --model tiny --batch 16 --warmup 3 --steps 20 --repeats 3 \
    --threads 4 --json "$work/train_throughput.json" >> "$log" 2>&1
  checkpoint=$(ls "$work"/claims/s0/federated/fedndif/checkpoints/global-round-*.pt 2>/dev/null \
    | tail -1)
  if [ -n "$checkpoint" ] && [ "$(left)" -gt 30 ]; then
    timeout "$(left)" "$py" benchmarks/denoise_volume.py --work "$work/denoise" \
      --device "$device" --precision bf16 --batch-size 64 --sizes 192x192x400 \
      --use-checkpoint "$checkpoint" --json "$work/denoise.json" >> "$log" 2>&1
  fi
fi

say "writing gpu.json / gpu.md"
"$py" benchmarks/gpu_summary.py "$work" "$out" --device "$device" --experiment "$experiment" \
  --seeds "$seeds" --claims-seconds "$claims_s" --total-seconds "$(( $(date +%s) - start ))" \
  >> "$log" 2>&1 || say "summary FAILED"
(cd "$work" && find . \( -name metrics.csv -o -name metrics_seeds.csv -o -name report.md \
  -o -name config.yaml -o -name metrics.jsonl -o -name '*.log' -o -name 'claims.*' \
  -o -name 'selection*.json' -o -name metrics_summary.json \) -not -path '*/sites/*' -print0 \
  | tar czf - --null -T -) > "$out/runs.tgz"
say "end; $(left) s of the budget left"
