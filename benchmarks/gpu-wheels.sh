#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded here into .whl/ (git-ignored) and carried with the
# run. Its image has torch, numpy, scipy, scikit-image, matplotlib, tqdm, einops, onnx,
# onnxruntime, rich, typer, click, httpx, pyyaml, but no MONAI, nibabel, pydicom, hydra, and no
# Flower: the claims run federates in process (simulation.engine=inprocess), which needs the
# flwr package and what it imports (fastapi, pydantic and requests among them; certifi and idna
# the image has, with httpx), not Ray or a SuperLink. grpcio and protobuf come too:
# Flower's generated code checks their versions.
#   benchmarks/gpu-wheels.sh                 (PY=3.11 fills .whl-3.11 for a local dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
version=${PY:-3.12}
dest=${DEST:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_34_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d "$dest" \
  monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 hydra-core==1.3.8 omegaconf==2.3.1 \
  PyWavelets==1.9.0 tomli-w==1.2.0 flwr==1.42.0 iterators==0.0.2 pathspec==1.1.1 \
  pycryptodome==3.24.1 cryptography==46.0.3 cffi==2.0.0 pycparser==2.23 protobuf==6.33.6 \
  grpcio==1.85.3 grpcio-health-checking==1.81.1 tomli==2.5.0 fastapi==0.138.2 starlette==1.3.1 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  annotated-doc==0.0.7 typing-extensions==4.16.0 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 \
  requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
# antlr4 (hydra's parser runtime) is published as source only: build its pure-Python wheel here.
"$py" -m pip wheel -q --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
du -sh "$dest"
