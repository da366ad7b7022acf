#!/usr/bin/env bash
# CPU setup for relook: a .venv with the CPU torch wheel (never CUDA wheels, never torchvision),
# then relook and all its extras constrained to that torch. Idempotent; ~2-4 minutes when fresh.
# GPU users: install your own torch, then `pip install -e ".[all]"` (no constraint).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${RELOOK_TORCH:-torch==2.13.0}
# transformers is pinned too: relook-tiny's bit-for-bit rebuild (models/relook-tiny/README.md)
# and the golden-rows test (tests/train/golden_loop_rows.json lists the versions it was verified
# with; other versions skip it) depend on it. Re-verify both before moving this pin.
TRANSFORMERS_PIN=${RELOOK_TRANSFORMERS:-transformers==5.24.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
printf '%s\n' "$TORCH_PIN" "$TRANSFORMERS_PIN" > .venv/relook-constraints.txt
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_PIN"
fi
.venv/bin/pip install -q -c .venv/relook-constraints.txt -e ".[all]"
if .venv/bin/python -c "import torchvision" 2>/dev/null; then
  echo "torchvision is installed in .venv: it breaks transformers' image processors on CPU (docs/gotchas.md); removing" >&2
  .venv/bin/pip uninstall -y -q torchvision
fi
.venv/bin/python -c "import torch, transformers; print('relook env ready: torch', torch.__version__, '| transformers', transformers.__version__)"
