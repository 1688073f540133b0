#!/usr/bin/env bash
# The GPU check: the CUDA tests (bf16/fp16 tangents at T_MIN and T_MAX against fp32, fused attention also under the
# JVP with App. F's tangent, a torchrun process on NCCL, and on a machine with 2 GPUs the 2-rank NCCL check that the
# one-pass step's gradients are identical on both ranks and the mean of theirs), then one table: diffusion / sCT / sCD
# step time, images/s and peak memory of sCM's S U-Net (280M) on random 64x64x4 latents in bf16 at the largest
# power-of-two batch that fits, one-pass rows beside the two-pass ones and a stock-network row, and 1- and 2-step
# sampling against Heun with 35 NFE. Not yet run on a GPU.
#
#   bash gpu_check.sh                 # one GPU and a CUDA build of torch >= 2.11 with numpy, pillow, tqdm, pytest
#   PYTHON=/path/to/python bash gpu_check.sh
#
# It installs nothing and needs no network (diffusers is not needed: its test skips). Each part has its own limit:
# the card 30 s, the tests 180 s, the benchmark 420 s, so the whole check ends within 11 minutes.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 30 "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
timeout 180 "$PY" -m pytest -q -rs test_scm.py -k "cuda or nccl" -p no:cacheprovider
timeout 420 "$PY" bench.py --device cuda --precision bf16 --batch auto --sizes s --rounds 3
