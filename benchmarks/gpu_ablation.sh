#!/usr/bin/env bash
# The GPU runs owed by the ablation and artifacts work (issue 7), on an H200, fp16, real
# configs with random weights. Each `fme ablate` measures, in one process on the same inputs:
# stock eager, every subset of the exact passes, the slicer at 2/4/8 chunks, diffusers' own
# memory option (forward chunking for the UNets, decode_chunk_size for the VAE) and Inductor.
# Writes benchmarks/results/ablation-<case>.{md,json,png} and artifact-load-svd.json.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
common="--dtype fp16 --device cuda --repeats 5 --chunks 2,4,8 --out $R"
fme ablate --model svd --frames 14 --height 576 --width 1024 --batch 2 $common
fme ablate --model svd-xt --frames 25 --height 576 --width 1024 --batch 2 $common
fme ablate --model animatediff --frames 16 --height 512 --width 512 --batch 2 $common
fme ablate --model svd-vae --frames 14 --height 576 --width 1024 --batch 1 $common
# Artifact: compile and save the SVD UNet, then load it in a fresh process, timed.
fme compile --model svd --frames 14 --height 576 --width 1024 --batch 2 --dtype fp16 --device cuda \
    --passes slice,group --out $R/svd-unet.fme
python benchmarks/time_artifact_load.py $R/svd-unet.fme --model svd --frames 14 --height 576 --width 1024 \
    --batch 2 --dtype fp16 --device cuda --json $R/artifact-load-svd.json
ls -l $R/svd-unet.fme
rm $R/svd-unet.fme  # weights are not in it, but it is still not a result to commit
