#!/usr/bin/env bash
# GPU readiness in one go, on a machine with CUDA (< 5 min): the README's set-up only,
# then the tests marked `gpu` (AMP training of both models, GPU tile sizing, OOM retry
# with a forced small memory limit, two workers sharing the GPU) and the GPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
make venv >/dev/null
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.cuda.get_device_name())"
.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py
.venv/bin/python bench/bench_gpu.py --device cuda
