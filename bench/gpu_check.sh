#!/usr/bin/env bash
# The GPU run of benchmarks 1 (extraction, wav2vec2-base path) and 3 (training), as one short script
# for a machine with a CUDA GPU and a python3 that holds torch + transformers + h5py + psutil.
# Results go to $OUT (default bench/results): gpu_exactness.json, gpu_profile.json, extraction_cuda.json,
# training_cuda_bf16.json, training_cuda.json, and one log, gpu_check.log (the device tool returns at
# most 8 files). Usage: bash bench/gpu_check.sh
# Packages missing on such an image can come as wheels in ./.whl (soundfile, cffi, pycparser, soxr,
# omegaconf). PyAV is only needed for containers other than WAV, so a stand-in module is used when it is absent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/emofuse-site .whl/*.whl \
    && export PYTHONPATH=/tmp/emofuse-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import av" 2>/dev/null; then
  mkdir -p /tmp/emofuse-stub/av && : > /tmp/emofuse-stub/av/__init__.py
  export PYTHONPATH=/tmp/emofuse-stub${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
CACHE=${CACHE:-/tmp/emofuse-bench-mosei}
CONFIGS=${CONFIGS:-paper,fast}
STEPS=${STEPS:-exactness,profile,extraction,training}  # a subset, e.g. STEPS=exactness,profile
step() { [[ ",$STEPS," == *",$1,"* ]]; }
# In order of importance, each under its own limit, so that one stuck step leaves the rest.
step exactness && timeout "${T_EXACT:-90}" $PY bench/gpu_exactness.py --device cuda --out "$OUT/gpu_exactness.json" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
step profile && timeout "${T_PROFILE:-150}" $PY bench/gpu_profile.py --device cuda --out "$OUT/gpu_profile.json" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
step extraction && timeout "${T_EXTRACT:-180}" $PY bench/extraction.py --device cuda --skip-offline --clips "${CLIPS:-200}" \
  --out "$OUT/extraction_cuda.json" 2>&1 | tee -a "$OUT/gpu_check.log"
if step training; then
  timeout "${T_TRAIN_BF16:-150}" $PY bench/training.py --device cuda --bf16 --configs "$CONFIGS" --cache "$CACHE" \
    --time-scale "${SCALE:-0.3}" --out "$OUT/training_cuda_bf16.json" 2>&1 | tee -a "$OUT/gpu_check.log"
  timeout "${T_TRAIN:-100}" $PY bench/training.py --device cuda --configs "$CONFIGS" --cache "$CACHE" \
    --time-scale "${SCALE:-0.3}" --out "$OUT/training_cuda.json" 2>&1 | tee -a "$OUT/gpu_check.log"
  rm -rf "$CACHE"
fi
