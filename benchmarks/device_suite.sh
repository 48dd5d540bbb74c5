#!/usr/bin/env bash
# The engine's speed benchmarks (fused chunks, SFA's step, sweeps) on an accelerator, as one script (run from the repository root on
# a machine whose JAX sees the GPU or TPU; figures into $OUT, default benchmarks/device/):
#   bash benchmarks/device_suite.sh
# Each line is one benchmark of benchmarks/RESULTS.md, measured side by side in one run; the
# 64-configuration sweep is the one a CPU cannot give (its lanes fill a device one model does not).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/device}
export JAX_PLATFORMS=${JAX_PLATFORMS:-}  # empty: the workers use the accelerator JAX finds
mkdir -p "$out"
python -c 'import jax; print(jax.devices())' | tee "$out/devices.txt"
python benchmarks/transform_overhead.py --json "$out/transform_overhead.json" | tee "$out/transform_overhead.txt"
python benchmarks/engine_overhead.py --rounds 5 --cold-rounds 3 --no-breakdown --json "$out/engine_pair.json" | tail -8
python benchmarks/engine_overhead.py --stream permuted --rounds 3 --cold-rounds 2 --no-breakdown --json "$out/engine_permuted.json" | tail -8
python benchmarks/sweep_throughput.py --rounds 1 --json "$out/sweep_8.json" | tail -2
python benchmarks/sweep_throughput.py --rounds 1 --configurations 64 --json "$out/sweep_64.json" | tail -2
