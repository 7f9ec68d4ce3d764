#!/usr/bin/env bash
# On a machine with a CUDA GPU: the device tests (every device present), then a larger
# minilm-finetune collection through the Hugging Face Trainer on the GPU, a fit and an
# evaluation, ending with a summary table. Meant to finish in under 10 minutes on one GPU.
# Needs a CUDA build of torch in the environment (this script installs none); CI never runs it.
#   OUT=out/gpu RUNS=64 STEPS=50 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu-check}
RUNS=${RUNS:-64}
STEPS=${STEPS:-50}
HELDOUT=${HELDOUT:-16}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is visible to $PYTHON (torch.cuda.is_available() is False); nothing to check" >&2
    exit 1
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[text,hf,test]"
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "gpu_check: device tests"
"$PYTHON" -m pytest -q tests/test_devices.py tests/collect/test_hf_collect.py -k "device or minilm" -p no:cacheprovider

start=$(date +%s)
echo "gpu_check: collecting $RUNS runs x $STEPS steps of minilm-finetune on cuda into $OUT/runs"
"$PYTHON" -m simfluence.cli collect minilm-finetune --runs "$RUNS" --steps "$STEPS" --device cuda --out "$OUT/runs"
collected=$(date +%s)
"$PYTHON" -m simfluence.cli split "$OUT/runs" --heldout "$HELDOUT" --out-dir "$OUT"
for method in auto linear-trajectory linear-identity; do
    "$PYTHON" -m simfluence.cli fit "$OUT/runs-train.npz" --method "$method" --out "$OUT/$method.npz" >/dev/null
done
fitted=$(date +%s)
echo
echo "gpu_check summary: collection $((collected - start)) s for $RUNS runs, fits $((fitted - collected)) s"
for method in auto linear-trajectory linear-identity; do
    "$PYTHON" -m simfluence.cli evaluate "$OUT/$method.npz" "$OUT/runs-heldout.npz"
    echo
done
