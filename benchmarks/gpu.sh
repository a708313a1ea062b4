#!/usr/bin/env bash
# GPU benchmarks (issue 9), one script for a lent GPU machine, about 5-8 minutes:
#   1. training throughput (slice stacks/s) of the default model at 128x128 and 192x192;
#   2. whole-volume denoising of a 192x192x400 volume at the default sampler, bf16 and fp32,
#      through the real command path (NIfTI in, automatic liver VOI, sampling, NIfTI out), with
#      wall time and peak GPU memory;
#   3. the 128x128x96 volume, bf16;
#   4. the same 192x192x400 volume on 2 CPU cores of the same machine (taskset), as the command
#      runs there by default (ONNX Runtime, fp32), so one run gives both numbers.
# Denoising uses a patch-trained timing checkpoint (64-px windows over the body, as
# data.patch_size=64 trains it) unless CHECKPOINT names another.
# Results land in $OUT (or runs/gpu): *.json and gpu.log. Record them in BENCHMARKS.md.
#
# The GPU machine has torch but no MONAI/nibabel/pydicom/hydra and no package registry:
#   here:   benchmarks/gpu-wheels.sh                      (fills .whl/, git-ignored)
#   there:  run tool, carry [".whl"], command "bash benchmarks/gpu.sh"
# On a machine with the project's venv, it runs as is (DEVICE=cpu for a dry run of the plumbing).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
device=${DEVICE:-cuda}
mkdir -p "$out"
py=python3
if [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
if ! "$py" -c "import monai, nibabel, pydicom, hydra" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fed-ndif-site .whl/*.whl
  export PYTHONPATH=/tmp/fed-ndif-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
sizes_train=${SIZES_TRAIN:-"128 192"}
volume=${VOLUME:-192x192x400}
small=${SMALL_VOLUME:-128x128x96}
checkpoint=(--patch-size 64)
if [ -n "${CHECKPOINT:-}" ]; then checkpoint=(--use-checkpoint "$CHECKPOINT"); fi
{
  date -u
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  "$py" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"
  # shellcheck disable=SC2086
  "$py" benchmarks/train_throughput.py --device "$device" --sizes $sizes_train \
    --kinds diffusion unet --batch 16 --warmup 3 --steps 20 --repeats 3 --threads 8 \
    --json "$out/train_throughput.json"
  for precision in bf16 fp32; do
    "$py" benchmarks/denoise_volume.py --work "$out/work" --device "$device" \
      --precision "$precision" --batch-size 64 --sizes "$volume" "${checkpoint[@]}" \
      --json "$out/denoise_${volume}_${precision}.json"
  done
  "$py" benchmarks/denoise_volume.py --work "$out/work" --device "$device" --precision bf16 \
    --batch-size 64 --sizes "$small" "${checkpoint[@]}" --json "$out/denoise_${small}_bf16.json"
  pin=(); if command -v taskset >/dev/null; then pin=(taskset -c 0,1); fi
  "${pin[@]}" "$py" benchmarks/denoise_volume.py --work "$out/work" --device cpu \
    --threads 2 --sizes "$volume" "${checkpoint[@]}" --json "$out/denoise_${volume}_cpu2.json"
  date -u
} 2>&1 | tee "$out/gpu.log"
