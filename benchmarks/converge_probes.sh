#!/usr/bin/env bash
# Diffusion training variants, one change at a time: local-only on site_a and
# site_b of an experiment=converge run (benchmarks/converge.py ROOT makes its sites) at that
# regime's per-site budget (1000 steps of 8 patches of 32²), then each site's test split scored
# with every variant paired against the default (ROOT/probes/eval_<site>/report.md).
#   bash benchmarks/converge_probes.sh runs/converge      # the two sites side by side, one core each
# Resumable: a trained variant or a finished evaluation is skipped. Writes ROOT/probes/pooled.md:
# both sites in one paired table per variant and metric.
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
# Both sites' test subjects in one paired comparison per variant (8 subjects), Holm over all.
.venv/bin/python - "$P" > "$P/pooled.md" <<'PY'
import sys
from pathlib import Path

from fed_ndif.evaluation.compare import read_rows
from fed_ndif.evaluation.statistics import holm, paired_difference

probes = Path(sys.argv[1])
rows = [r for site in ("site_a", "site_b")
        for r in read_rows(probes / f"eval_{site}" / "metrics.csv")]
better = {"psnr": True, "abs_suvpeak_ideal_bias_pct_ge10": False,
          "abs_suvmean_ideal_bias_pct_ge10": False, "nps_power_liver": False}
found = holm([paired_difference(rows, variant, "default", metric, higher_is_better=higher)
              for variant in ("min_snr5", "v_pred", "x0_plain")
              for metric, higher in better.items()],
             higher_is_better=better)
print("| variant − default | metric | difference | 95 % CI | Holm p | verdict | subjects |")
print("|---|---|---|---|---|---|---|")
for d in found:
    print(f"| {d.method} | {d.metric} | {d.mean:+.2f} | [{d.low:+.2f}, {d.high:+.2f}] | "
          f"{d.p_adjusted:.3f} | {d.verdict} | {d.subjects} |")
PY
echo done >> "$P/times.txt"
