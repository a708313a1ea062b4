#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, scipy, scikit-image, tqdm, einops, but no
# MONAI, nibabel, pydicom, hydra, and ONNX Runtime for the CPU number): downloaded here into .whl/ (git-ignored), carried with the run.
#   benchmarks/gpu-wheels.sh      then see benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 hydra-core==1.3.8 \
  omegaconf==2.3.1 PyWavelets==1.9.0 onnx==1.23.2 onnxruntime==1.32.0
# antlr4 (hydra's parser runtime) is published as source only: build its pure-Python wheel here.
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
