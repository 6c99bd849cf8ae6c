#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine: the gpu-marked tests, the embedder tests and benchmarks.gpu_speed.
#
# That machine's Python has torch, torchvision, onnxruntime, scipy, pyyaml, tqdm, pytest and hypothesis, but
# not faiss or flask. Those travel as wheels in .whl/ (git-ignored), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl faiss-cpu==1.15.1 flask==3.1.3 itsdangerous==2.2.0 blinker==1.9.0 gunicorn==27.0.1
# (19 MB), copied to that machine with the repository, then run from the repository root:
#
#   bash benchmarks/gpu_session.sh
#
# It writes everything under $OUT (or ./gpu-out): the GPU tests' log, gpu_speed.md rows, gpu.json and the
# profiler's table and trace. Copy the rows into benchmarks/results/gpu_speed.md afterwards.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv | tee "$OUT/gpu.txt"
# 1. the tests marked gpu (they skip without CUDA), then the embedder tests, on the GPU (the suite's other tests
#    run in CI). Only the modules that hold a gpu test are collected: others import what this machine lacks.
python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) 2>&1 \
    | tee "$OUT/tests.log" | tail -5
python3 -m pytest -q -p no:cacheprovider tests/test_training_embed_gallery.py 2>&1 | tee -a "$OUT/tests.log" | tail -5
# 2. every speed figure against its same-run baseline
python3 -m benchmarks.gpu_speed --results "$OUT/gpu_speed.md" --json "$OUT/gpu.json" --profile "$OUT/profile" \
    2>&1 | tee "$OUT/gpu_speed.log" | tail -12
