#!/usr/bin/env bash
# One short, prepared GPU check (run through the device tool on a CUDA machine):
# the CUDA paths (bf16 autocast, channels_last, decoded cache) and figure 6 of issue 6:
# tlreg with AMP + channels_last vs the classic fp32 loop, feature-extract and fine-tune.
# Data: the repository's demo copy of hymenoptera (../shared does not travel there).
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl -e . \
  -e plugins/tlreg-efficientnet-lite 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" \
  | tee -a "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1 TLREG_CACHE_DIR=/tmp/tlreg-cache
# CUDA path check: fine-tune with bf16 autocast + channels_last + decoded cache, then fp16.
tlreg train demo/hymenoptera --backbone efficientnet_lite0 --policy finetune --epochs 2 \
  --device cuda --decoded-cache memory --out /tmp/ck-bf16 --quiet 2>&1 | tail -2
tlreg train demo/hymenoptera --backbone resnet18 --no-pretrained --policy finetune --epochs 1 \
  --device cuda --precision fp16 --out /tmp/ck-fp16 --quiet 2>&1 | tail -2
cp /tmp/ck-bf16/summary.json "$OUT/check-bf16-summary.json"
cp /tmp/ck-bf16/history.json "$OUT/check-bf16-history.json"
timeout 330 python3 -m bench.perf --figure 1 --figure 2 --device cuda --data demo/hymenoptera \
  --runs 2 --models efficientnet_lite0,resnet18 --results "$OUT" --no-doc 2>&1 | tail -25
ls "$OUT"
