#!/usr/bin/env bash
# The GPU runs owed by the slice (issue 4) and group (issue 5) passes, on an H200, fp16, real
# configs with random weights. Each `fme bench` measures stock eager and the baselines in
# the same process on the same inputs. Writes benchmarks/results/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
common="--dtype fp16 --device cuda --repeats 5"
# issue 4: slice alone against stock and diffusers' forward chunking
fme bench --model svd --frames 14 --height 576 --width 1024 --batch 2 $common --passes slice \
    --baselines forward-chunking --json $R/slice-svd-f14-576x1024-b2.json
fme bench --model svd-xt --frames 25 --height 576 --width 1024 --batch 2 $common --passes slice \
    --baselines forward-chunking --json $R/slice-svd-xt-f25-576x1024-b2.json
fme bench --model animatediff --frames 16 --height 512 --width 512 --batch 2 $common --passes slice \
    --baselines forward-chunking --json $R/slice-animatediff-f16-512x512-b2.json
fme bench --model svd-vae --frames 14 --height 576 --width 1024 --batch 1 $common --passes slice \
    --json $R/slice-svd-vae-f14-576x1024.json
fme bench --model svd --frames 14 --height 576 --width 1024 --batch 2 $common --passes slice \
    --memory-budget 1GiB --json $R/slice-svd-budget-1GiB.json
# issue 5: kernels' bandwidth, and slice+group against stock, slice alone and Inductor
python benchmarks/bench_kernels.py --json $R/kernels-fp16.json
fme bench --model svd --frames 14 --height 576 --width 1024 --batch 2 $common --passes slice,group \
    --baselines inductor --json $R/slice-group-svd-f14-576x1024-b2.json
