#!/usr/bin/env bash
# The GPU runs owed by Step Rehash (issue 6), on an H200, fp16, real configs with random
# weights, 25 steps with guidance on. Each run builds the whole pipeline and, in one process
# on the same inputs and seed, generates with the stock UNet (every step full), then with the
# UNet compiled with rehash at the default cache point, 13 of 25 steps full, under the
# key-step search (calibrated) and under the uniform every-other-step schedule.
#
# Targets (not measured yet: no GPU was available to this work):
#   - UNet stage of the 13-of-25 runs >= 1.8x faster than stock eager in the same run
#   - final latents' relative L2 against the full schedule, reported for both schedules
# Writes benchmarks/results/rehash-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
common="--steps 25 --full-steps 13 --dtype fp16 --device cuda"
python benchmarks/bench_rehash.py --pipeline svd --frames 14 --height 576 --width 1024 $common \
    --json $R/rehash-svd-f14-576x1024-s25-k13-fp16.json
python benchmarks/bench_rehash.py --pipeline animatediff --frames 16 --height 512 --width 512 $common \
    --json $R/rehash-animatediff-f16-512x512-s25-k13-fp16.json
# composed with the exact passes (same targets; memory of the UNet stage as with slice,group)
python benchmarks/bench_rehash.py --pipeline svd --frames 14 --height 576 --width 1024 $common \
    --passes slice,group --json $R/rehash-slice-group-svd-f14-576x1024-s25-k13-fp16.json
