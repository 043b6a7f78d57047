#!/usr/bin/env bash
# GPU runs of the fast generate() path, one phase per device call (see docs/BENCHMARKS.md).
#   check     GPU tests of the static path and kernels, then a random-weight SmolLM2-shape row set
#   real      the real SmolLM2-135M (GGUF in two transfers: ../shared/gpu-model.md), 8K prompts, batch 1 and 32
#   llama128  Llama-3-8B shape, 128K x 6        llama512  Llama-3-8B shape, 512K x 1
# Logs and JSON rows go to $OUT.
set -uo pipefail
phase=$1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPOTLIGHT_CACHE_DIR=/root/sacache
mkdir -p "$OUT"
log="$OUT/$phase.log"
case $phase in
check)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_static.py tests/test_kernels.py 2>&1 | tail -n 15
      python3 -m spotlight_attn.cli.main bench decode --shape smollm2-135m --context 8K --batch 1,32 --budget 0.1 \
          --hasher linear,mlp --json "$OUT/check_smollm2_shape.json"
    } 2>&1 | tee "$log" ;;
real)
    [ -f /root/smollm2.gguf ] || { [ -f /root/xfer/part1 ] || { echo "machine was recycled: redo call 1"; exit 3; }
        cat /root/xfer/part1 .model/b/part2 > /root/smollm2.gguf; }
    echo "$(cat .model/b/sha256)  /root/smollm2.gguf" | sha256sum -c - || exit 4
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    { python3 -m spotlight_attn.cli.main bench decode --model /root/smollm2.gguf --context 8000 --batch 1,32 --budget 0.1 \
          --hasher learned,linear --json "$OUT/real_smollm2.json"
    } 2>&1 | tee "$log" ;;
llama128)
    python3 -m spotlight_attn.cli.main bench decode --shape llama3-8b --context 128K --batch 6 --budget 0.02 \
        --hasher linear,mlp --json "$OUT/llama3_128k_x6.json" 2>&1 | tee "$log" ;;
llama512)
    python3 -m spotlight_attn.cli.main bench decode --shape llama3-8b --context 512K --batch 1 --budget 0.02 \
        --hasher linear,mlp --json "$OUT/llama3_512k_x1.json" 2>&1 | tee "$log" ;;
esac
