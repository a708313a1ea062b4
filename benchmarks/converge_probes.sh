#!/usr/bin/env bash
# Diffusion training variants, one change at a time: local-only on site_a and
# site_b of an experiment=converge run (benchmarks/converge.py ROOT makes its sites) at that
# regime's per-site budget (1000 steps of 8 patches of 32²), then each site's test split scored
# with every variant paired against the default (ROOT/probes/eval_<site>/report.md).
#   bash benchmarks/converge_probes.sh runs/converge      # the two sites side by side, one core each
# Resumable: a trained variant or a finished evaluation is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 WANDB_MODE=offline
root=${1:-runs/converge}
P=$root/probes
common=(model=tiny data.patch_size=32 train.batch_size=8 train.steps=1000 train.val_every=100
        train.val_max_studies=1 train.checkpoint_every=0
        'data.held_out_levels=[{site: site_a, levels: [0.05]}]')
names=(default min_snr5 v_pred x0_plain)
declare -A variants=(
  [default]=""
  [min_snr5]="diffusion.min_snr_gamma=5.0"
  [v_pred]="diffusion.prediction_type=v_prediction model.residual=false"
  [x0_plain]="model.residual=false"
)
probe_site() {
  local site=$1 name out start models=()
  mkdir -p "$P/$site"
  for name in "${names[@]}"; do
    out=$P/$site/$name
    [ -f "$out/last.pt" ] && continue
    start=$(date +%s)
    # shellcheck disable=SC2086  # a variant is zero or more overrides
    .venv/bin/fed-ndif train-local "$root/sites/$site/manifest.csv" "$out" "${common[@]}" \
      ${variants[$name]} > "$out.log" 2>&1
    echo "$site $name $(( $(date +%s) - start )) s" >> "$P/times.txt"
  done
  for name in "${names[@]}"; do models+=(--model "$name=$P/$site/$name/last.pt"); done
  [ -f "$P/eval_$site/metrics.csv" ] || .venv/bin/fed-ndif evaluate \
    "$root/sites/$site/manifest.csv" "$P/eval_$site" "${models[@]}" --no-filters \
    --no-detectability --count-level 0.1 --reference default --overwrite > "$P/eval_$site.log" 2>&1
}
probe_site site_a & a=$!
probe_site site_b & b=$!
wait $a && wait $b
echo done >> "$P/times.txt"
