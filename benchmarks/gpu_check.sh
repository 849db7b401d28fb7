#!/usr/bin/env bash
# One prepared command for a GPU session: environment, pytest -m gpu, torch.compile warm-up (timed apart),
# training step (device / end to end), data wait, peak memory, inference (1 fold; 5 folds x 8 mirrors),
# augmentation throughput. Ends within 8.5 minutes on CUDA (a total budget cuts the stages' own).
# Usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR] [--keep]   (see benchmarks/gpu_check.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import voxseg" 2>/dev/null; then
    echo "gpu_check: '$PYTHON -c \"import voxseg\"' fails in $(pwd); install the project as the README says" \
         "(pip install -e .) — this script installs nothing and needs no network" >&2
    exit 1
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
