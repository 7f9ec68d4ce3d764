#!/usr/bin/env bash
# The main job on the built-in default task: collect real digits-mlp runs, fit simulators on
# fitting runs, score them on held-out runs beside the baselines, and write the HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-out}
simfluence collect digits-mlp --runs 48 --steps 100 --out "$OUT/digits"
simfluence split "$OUT/digits" --heldout 8 --seed 0 --out-dir "$OUT"
for method in linear-identity linear additive; do
    simfluence fit "$OUT/digits-train.npz" --method "$method" --out "$OUT/$method.npz"
done
for method in linear-identity linear additive; do
    echo
    simfluence evaluate "$OUT/$method.npz" "$OUT/digits-heldout.npz"
done
echo
simfluence report "$OUT/linear-identity.npz" "$OUT/digits-heldout.npz" --out "$OUT/report.html"
echo "open $OUT/report.html in a browser: metrics, trajectories, influence heat map, top examples"
