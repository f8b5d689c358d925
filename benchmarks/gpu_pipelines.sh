#!/usr/bin/env bash
# The GPU runs owed by whole-pipeline optimization (issue 8), on an H200, fp16, real configs
# with random weights. Each `fme bench --pipeline` generates the same video twice in one
# process, same seed, every component resident on the GPU: with the stock pipeline, then
# after `fmecompile.optimize(pipe)` (UNet and VAE decoder compiled, whole videos decoded per
# VAE call). It reports the pipeline's activation peak (allocated beyond the resident
# weights), reserved peak, NVML used, wall time, and the frames' relative L2 / max-abs error.
#
# Targets (not measured yet: no GPU was available to this work):
#   - activation_peak_ratio (optimized / stock peak allocated, same run) <= 0.45
#   - rel_l2 of the optimized frames within fp16 rounding of the stock frames
#     (the exactness contract: relative L2 <= 2e-3)
# Writes benchmarks/results/pipeline-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
common="--dtype fp16 --device cuda --passes slice,group --repeats 2"
# SVD (14 frames) at its published size; guidance on (the pipeline's default 1.0 -> 3.0 ramp).
fme bench --pipeline svd --frames 14 --height 576 --width 1024 --steps 25 $common \
    --json $R/pipeline-svd-f14-576x1024-s25-fp16.json
# AnimateDiff (SD 1.5 + motion adapter v1-5-2) at its published size; guidance 7.5.
fme bench --pipeline animatediff --frames 16 --height 512 --width 512 --steps 25 $common \
    --json $R/pipeline-animatediff-f16-512x512-s25-fp16.json
