#!/usr/bin/env bash
# Issue 17 part 4: the accelerator benchmarks as one script for one H200 (each measurement capped by
# `timeout`: 150 s, 240 s for the evaluation and pipeline ones; not yet run on a GPU).
#
#   bash benchmarks/h200_run.sh OUTDIR          # from the repository root, with ssl_ad installed
#
# Needs a Python with ssl_ad's dependencies (pip install -e .) and a CUDA jax (e.g.
# pip install "jax[cuda13]"): the training and evaluation code imports TensorFlow (tf.data,
# tfds, tf.summary), so a GPU image without TensorFlow cannot run it. Writes one JSON per
# measurement into OUTDIR and the whole log to OUTDIR/log.txt; every command is printed first.
# What each measures: benchmarks/README.md (throughput.py, eval_scale.py, pipeline_feed.py).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/h200_run.sh OUTDIR}
mkdir -p "$OUT"
PY=${PY:-python3}
PEAK=989  # H200 SXM dense bf16 TFLOP/s
exec > >(tee -a "$OUT/log.txt") 2>&1

run() {  # one measurement; a failure is logged and the script goes on
  echo "+ $*"
  timeout "${LIMIT:-150}" "$@" || echo "FAILED ($?): $*"
}

date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

# 224 px recipes in bfloat16 (batch per device; raise until memory or speed stops improving).
run "$PY" benchmarks/throughput.py --config=configs/mae_vitb16_224.py --config.model.dtype=bfloat16 \
    --config.batch_size=256 --peak_tflops=$PEAK --steps=30 --warmup=5 --out="$OUT/mae_vitb16_224.json"
run "$PY" benchmarks/throughput.py --config=configs/dino_vits16_224.py --config.model.dtype=bfloat16 \
    --config.batch_size=256 --peak_tflops=$PEAK --steps=30 --warmup=5 --out="$OUT/dino_vits16_224.json"
# The 32 px CIFAR-10 ViT-Ti/4 recipes (synthetic batches: no data set on the machine).
run "$PY" benchmarks/throughput.py --config=configs/mae_cifar10.py --peak_tflops=$PEAK --steps=50 --warmup=5 \
    --out="$OUT/mae_cifar10.json"
run "$PY" benchmarks/throughput.py --config=configs/dino_cifar10.py --peak_tflops=$PEAK --steps=50 --warmup=5 \
    --out="$OUT/dino_cifar10.json"
# The evaluation's five feature scorers at CIFAR-10 / ViT-S scale (10 leave-one-class-out rounds).
LIMIT=240 run "$PY" benchmarks/eval_scale.py --out="$OUT/eval_scale.json"
# The host pipeline's rate on this machine's cores, and with the crops made on the GPU.
LIMIT=240 run "$PY" benchmarks/pipeline_feed.py --device_augment --peak_tflops=$PEAK --out="$OUT/pipeline_feed.json"
date -u
