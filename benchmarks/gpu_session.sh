#!/usr/bin/env bash
# The GPU checks on a CUDA machine, in two parts of at most about 5 minutes each, so that each fits one call
# with a 10-minute limit and either can be rerun alone:
#
#   bash benchmarks/gpu_session.sh 1     # the gpu-marked tests, gpu_speed knn embed decode, then the smoke step:
#                                        # sct train (CUDA, 2 epochs x 20 steps) -> sct export -> sct embed --device cuda,
#                                        # and gpu_speed's sct-train row from that run's metrics.jsonl
#   bash benchmarks/gpu_session.sh 2     # gpu_speed train jpeg (+ torch.compile and the profiler)
#   bash benchmarks/gpu_session.sh       # both, one after the other
#
# That machine's Python has torch, torchvision, onnxruntime, scipy, pyyaml, tqdm, pytest and hypothesis, but
# not faiss or flask. Those travel as wheels in .whl/ (git-ignored), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl faiss-cpu==1.15.1 flask==3.1.3 itsdangerous==2.2.0 blinker==1.9.0 gunicorn==27.0.1
# (19 MB), copied to that machine with the repository, then run from the repository root.
#
# Everything lands under $OUT (or ./gpu-out), section by section as each ends, so a kill keeps what finished:
# gpu.txt (the GPU), tests.log, gpu_speed.md (the result rows), gpu-1.json / gpu-2.json / gpu-sct-train.json
# (every number, and each failed section's error), gpu_speed-*.log, smoke/ (the sct commands' logs and the
# run's config and metrics.jsonl), profile/ (torch.profiler table and trace) and status-<part>.txt (each
# step's exit status). The JPEGs (16,384 in class folders) are written once to $JPEGS (/tmp/sct-jpegs) and
# reused by the other part on the same machine. Copy the rows into benchmarks/results/gpu_speed.md afterwards.
# The exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART=${1:-all}
case "$PART" in 1 | 2 | all) ;; *) echo "usage: bash benchmarks/gpu_session.sh [1|2|all]" >&2 && exit 2 ;; esac
OUT=${OUT:-gpu-out}
JPEGS=${JPEGS:-/tmp/sct-jpegs}
RUN=${RUN:-/tmp/sct-smoke-run}  # checkpoints are too large to bring back: only the logs and metrics go to $OUT
mkdir -p "$OUT/smoke"
export PYTHONUNBUFFERED=1
failed=0

# step NAME LOG COMMAND...: run COMMAND, its output appended to $OUT/LOG (last lines shown), its status recorded
step() {
    local name=$1 log=$2 started=$SECONDS
    shift 2
    "$@" 2>&1 | tee -a "$OUT/$log" | tail -15
    local status=${PIPESTATUS[0]}
    echo "$name: exit $status, $((SECONDS - started)) s" | tee -a "$OUT/status-$PART.txt"
    [ "$status" -eq 0 ] || failed=1
    return "$status"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv | tee "$OUT/gpu.txt"

part1() {
    # the tests marked gpu (they skip without CUDA), then the embedder tests, on the GPU (the suite's other tests
    # run in CI). Only the modules that hold a gpu test are collected: others import what this machine lacks.
    step "gpu tests" tests.log python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py)
    step "embed gallery tests" tests.log python3 -m pytest -q -p no:cacheprovider tests/test_training_embed_gallery.py
    step "gpu_speed knn embed decode" gpu_speed-1.log python3 -m benchmarks.gpu_speed --sections knn embed decode \
        --jpeg-dir "$JPEGS" --results "$OUT/gpu_speed.md" --json "$OUT/gpu-1.json"
    # the smoke step: the real CUDA trainer, export and GPU embedding on the same JPEGs (--dataset folder: the
    # first half of the classes train, the rest are the test split). No pretrained weights on that machine.
    rm -rf "$RUN" /tmp/sct-smoke-shards
    if step "sct train" smoke/train.log python3 -m sct train --dataset folder --data-root "$JPEGS" --out "$RUN" \
        --device cuda --pretrained none --arch resnet50 --image-size 256 --batch-size 256 --epochs 2 \
        --max-iters-per-epoch 20 --no-progress; then
        cp "$RUN/metrics.jsonl" "$RUN/config.yaml" "$OUT/smoke/"
        step "gpu_speed sct-train" gpu_speed-1.log python3 -m benchmarks.gpu_speed --sections sct-train \
            --train-run "$RUN" --results "$OUT/gpu_speed.md" --json "$OUT/gpu-sct-train.json"
        step "sct export" smoke/export.log python3 -m sct export --checkpoint "$RUN/last.pt" --out "$RUN/model.onnx" \
            && step "sct embed" smoke/embed.log python3 -m sct embed --checkpoint "$RUN/last.pt" \
                --model "$RUN/model.onnx" --images "$JPEGS" --out /tmp/sct-smoke-shards --device cuda --no-progress \
            && ls -lR /tmp/sct-smoke-shards | head -20 | tee -a "$OUT/smoke/embed.log"
    fi
}

part2() {
    step "gpu_speed train jpeg" gpu_speed-2.log python3 -m benchmarks.gpu_speed --sections train jpeg \
        --jpeg-dir "$JPEGS" --results "$OUT/gpu_speed.md" --json "$OUT/gpu-2.json" --profile "$OUT/profile"
}

case "$PART" in
    1) part1 ;;
    2) part2 ;;
    all) part1; part2 ;;
esac
exit "$failed"
