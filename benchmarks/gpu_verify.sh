#!/usr/bin/env bash
# The one prepared GPU run (issue 14 item 6), sized for one device call of at most 9 minutes
# on the H200 (diffusers travels as a wheel: run ../shared/gpu/fetch-wheels.sh here once and
# carry .whl). Each step has its own time limit and the run goes on past a failed step;
# every result lands under $OUT (default benchmarks/results): one JSON per step, one log.
#
#   device run, carry [".whl"]:  bash benchmarks/gpu_verify.sh
#   dry run here, tiny models on the CPU:  DRY_RUN=1 OUT=/tmp/verify bash benchmarks/gpu_verify.sh
#
# On CUDA, `fme bench` measures slice+group with CUDA graphs and, in the same run, without
# them (the "without CUDA graphs" row), each against stock eager: activation peak, GPU
# latency, host ms (until the call returns), rel L2; the JSON's report says per graph
# whether it was captured.
#
# Four sections, SECTIONS="models pipelines bodies bodies-budget" by default; on the device
# each takes up to about 9 minutes, so run them as four calls there: SECTIONS=models, then
# SECTIONS=pipelines, SECTIONS=bodies and SECTIONS=bodies-budget.
# "pipelines" (issue 23 item 6): whole generations with model CPU offload, 2 steps, random
# seeded weights from the real configs (benchmarks/pipeline_memory.py): SVD-XT (25 frames,
# 576x1024, fp16) stock (decode_chunk_size=25) against fme.optimize(pipe), and AnimateDiff
# (16 frames, 512x512) also against fme.optimize(pipe, memory_budget="6GiB"), the budget
# `fme plan` says it fits; torch.cuda.max_memory_allocated over each whole generation, the
# frames' rel L2 against stock (fp16 contract <= 2e-3).
# "bodies" (issue 24 items 5-6): hand kernels against Inductor bodies on the SVD UNet, 14
# frames, 576x1024, fp16, batch 2 (benchmarks/inductor_bodies.py): stock eager, stock
# torch.compile, fme identity, slice+group (hand kernels) and slice with Inductor bodies
# (Config(inductor_bodies=True)) at the default plan; "bodies-budget": the same at 0.5x the
# identity's predicted peak (planning under a budget takes minutes of CPU, so that call runs
# without the stock torch.compile row); latency, the caching allocator's peak, compile
# seconds (Inductor's at the first call included), rel L2, and the artifact's load in fresh
# processes with a cold and a warm Inductor cache.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/.site:$PWD"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONUNBUFFERED=1
SECTIONS=${SECTIONS:-models pipelines bodies bodies-budget}
if [ "${DRY_RUN:-0}" = 1 ]; then
    tiny=-tiny common="--dtype fp32 --device cpu --repeats 1 --warmup 0"
    svd="--frames 2 --height 64 --width 64" ad="--frames 2 --height 64 --width 64"
    whole="--tiny --dtype fp32 --device cpu" whole_svd="--frames 2 --height 64 --width 64" whole_ad=$whole_svd
    bodies="--dtype fp32 --device cpu --repeats 1 --warmup 0"
else
    tiny="" common="--dtype fp16 --device cuda --repeats 3 --warmup 1"
    svd="--frames 14 --height 576 --width 1024" ad="--frames 16 --height 512 --width 512"
    whole="--dtype fp16 --device cuda" whole_svd="--frames 25 --height 576 --width 1024"
    whole_ad="--frames 16 --height 512 --width 512"
    bodies="--dtype fp16 --device cuda --repeats 3 --warmup 1"
fi
# At most 8 files come back from a device call: the logs share one file.
step() {  # step NAME SECONDS COMMAND...: runs it with a limit, its output appended to verify.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/verify.log"
    timeout "$limit" "$@" >>"$OUT/verify.log" 2>&1
    echo "   exit $? after ${SECONDS}s total" | tee -a "$OUT/verify.log"
}
if [[ " $SECTIONS " == *" models "* ]]; then
    if [ "${DRY_RUN:-0}" != 1 ]; then  # Triton on the real GPU
        step kernels-tests 60 python3 -m pytest -q tests/test_kernels.py
        step kernels-bench 60 python3 benchmarks/bench_kernels.py --json "$OUT/kernels-fp16.json"
    fi
    step svd-unet 200 fme bench --model svd$tiny $svd --batch 2 $common --passes slice,group \
        --json "$OUT/verify-svd$tiny-b2.json"
    step svd-vae 90 fme bench --model svd-vae$tiny $svd --batch 1 $common --passes slice,group \
        --json "$OUT/verify-svd-vae$tiny.json"
    step animatediff 120 fme bench --model animatediff$tiny $ad --batch 2 $common --passes slice,group \
        --json "$OUT/verify-animatediff$tiny-b2.json"
fi
if [[ " $SECTIONS " == *" pipelines "* ]]; then
    step pipeline-svd-xt 300 python3 benchmarks/pipeline_memory.py --pipeline svd-xt $whole $whole_svd \
        --steps 2 --json "$OUT/pipeline-memory-svd-xt$tiny.json"
    step pipeline-animatediff 240 python3 benchmarks/pipeline_memory.py --pipeline animatediff $whole $whole_ad \
        --steps 2 --memory-budget 6GiB --json "$OUT/pipeline-memory-animatediff$tiny.json"
fi
if [[ " $SECTIONS " == *" bodies "* ]]; then
    step bodies-default 540 python3 benchmarks/inductor_bodies.py --model svd$tiny $svd --batch 2 $bodies \
        --plans default --json "$OUT/inductor-bodies-svd$tiny-b2-default.json"
fi
if [[ " $SECTIONS " == *" bodies-budget "* ]]; then
    step bodies-budget 540 python3 benchmarks/inductor_bodies.py --model svd$tiny $svd --batch 2 $bodies \
        --plans budget --no-stock-compile --json "$OUT/inductor-bodies-svd$tiny-b2-budget.json"
fi
ls -la "$OUT"
