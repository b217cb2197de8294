#!/usr/bin/env bash
# The GPU check (issue #32): quickstart on CUDA; train lora, qlora, ptuning_v2 and freeze on the bundled model; eval;
# serve with 8 clients; `chattune bench` with its MFU figure. Under ten minutes on one data-centre GPU. Writes
# docs/gpu.md (date, GPU, versions, each step's figures). Run from anywhere, on a machine with a CUDA GPU, after
# `pip install -e ".[test,qlora]"`. `bash benchmarks/gpu_check.sh --smoke` checks the script itself on any machine
# (a few steps each; writes a temporary report, never docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" != "--smoke" ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); use --smoke to check the script" >&2
    exit 2
fi
python -c "import bitsandbytes" 2>/dev/null || echo "gpu_check: bitsandbytes missing: the qlora step will be refused (pip install -e '.[qlora]')" >&2
exec timeout 900 python benchmarks/gpu_check.py "$@"
