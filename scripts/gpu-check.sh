#!/usr/bin/env bash
# vaelab on a machine with a CUDA GPU and its own PyTorch, in under 8 minutes:
#   bash scripts/gpu-check.sh [MNIST_DIR]
# installs vaelab into .venv-gpu beside the machine's torch (the venv sees it; nothing replaces it,
# whatever its version), runs the tests marked cuda, then benchmarks/gpu.py: the card, training
# throughput in fp32 and bf16, IWAE k=5000 on 10,000 test images, DDP over NCCL with two GPUs and,
# given MNIST's IDX files, full MNIST time to target.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu-check: this Python has no torch; run it with the Python whose torch has CUDA (PYTHON=...)")
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA GPU here")
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
if [ ! -x .venv-gpu/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv-gpu
fi
# every pin but torch's: the machine's torch satisfies vaelab's torch>=2.6 and stays as it is
grep -v '^torch==' scripts/constraints.txt > .venv-gpu/constraints.txt
.venv-gpu/bin/python -m pip install --quiet -c .venv-gpu/constraints.txt -e ".[dev]"
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'the venv lost the CUDA torch'"
start=$(date +%s)
timeout 150 .venv-gpu/bin/python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
echo "gpu-check: the cuda tests took $(( $(date +%s) - start )) s"
args=()
if [ $# -ge 1 ]; then args=(--mnist "$1"); fi
timeout 330 .venv-gpu/bin/python -m benchmarks.gpu "${args[@]}"
