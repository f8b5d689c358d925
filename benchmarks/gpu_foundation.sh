#!/usr/bin/env bash
# Foundation check on a GPU (issue 3): stock eager against the identity compile (passes=())
# for the real SVD UNet at 576x1024, 14 frames, batch 2, fp16. Same memory and time within
# noise, same output. Writes benchmarks/results/foundation-svd-identity.json.
set -euo pipefail
cd "$(dirname "$0")/.."
fme bench --model svd --frames 14 --height 576 --width 1024 --batch 2 --dtype fp16 --device cuda \
    --passes none --repeats 5 --json benchmarks/results/foundation-svd-identity.json
