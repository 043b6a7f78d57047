#!/usr/bin/env bash
# GPU runs of the fast generate() path (see docs/BENCHMARKS.md). Phases run in the order given:
#   stash     copy the first half of the real model's GGUF to /root/xfer (call 1 of ../shared/gpu-model.md)
#   tests     GPU tests of the static path and hashers, and every kernel test of tests/test_kernels.py on CUDA
#             (score_select's fused passes 2-3 run only there); the fused hash kernel's tests are the hash phase
#   llama128  Llama-3-8B shape, 128K x 6 (hf-static, dense, SimHash, learned-hash shape)
#   llama512  Llama-3-8B shape, 512K x 1 (dense, SimHash, learned-hash shape)
#   dl0       the learned-hash shape with layer 0 alone dense (--dense-layers 0), 128K x 6 and 512K x 1
#   freeze128, freeze512  the dense and learned-hash-shape rows with inductor's freezing (TORCHINDUCTOR_FREEZING=1:
#             weights as constants, so inductor concatenates q/k/v and gate/up into one GEMM each)
#   unfused128, unfused512  the dense, SimHash and learned-hash-shape rows with --no-fuse-projections (q/k/v and
#             gate/up as separate GEMMs, as before gen27), 128K x 6 and 512K x 1
#   guess128, guess512  the learned-hash shape with each score_select threshold prediction of GUESS_ROWS
#             (default "bands 0 exact": SPOTLIGHT_SELECT_GUESS's settings), the first beside dense
#             (GUESS_DENSE=0 leaves dense out), at 128K x 6 (GUESS_BATCH=3 for an H100) / 512K x 1
#   torch128  as llama128 with the hash through torch, not the fused kernel (SPOTLIGHT_FUSED_HASH=0; dense, SimHash, learned-hash shape)
#   real      the real SmolLM2-135M (call 2: the GGUF's second half), 8K prompts, batch 1 and 32
#   profile   where a step's time goes at 128K x 6 (benchmarks/profile_generate.py)
#   profile512  the same at 512K x 1
#   tune      launch variants of score_select and sparse_decode, and the step's hash, at these shapes (benchmarks/tune_kernels.py;
#             TUNE_ONLY=hash|select|decode for one of them)
#   ncu       Nsight Compute on the step's kernels at 128K x 6 (benchmarks/ncu_probe.py; HASH_VARIANT picks the hash variant)
#   retrieval `spotlight bench retrieval` at 128K, 512K and 1M, batch 1 and 8 (issue 13's score_select target)
#   gemm      the step's GEMMs alone against their weights' floor, cuBLAS and cuBLASLt (benchmarks/gemm_probe.py;
#             GEMM_AUTOTUNE=1 adds inductor's max-autotune templates, minutes of tuning)
#   hash      the fused hash kernel's tests compiled on CUDA
#   check     score_select against the reference at the step's sizes (benchmarks/select_check.py; seconds, where the
#             tests phase compiles for minutes: 8 of them for test_kernels.py's score_select tests alone)
#   train     the streaming hash trainer's throughput at the Llama-3-8B shape, 8K chunks (benchmarks/train_throughput.py),
#             and its GPU test
# SPOTLIGHT_FUSED_HASH=0 in the environment turns the fused hash kernel off for every phase.
# LLAMA_BASELINES=dense leaves transformers' own StaticCache row out of llama128 (a process of its own:
# the model build, a 43 s warm-up, 301 ms steps); `hash llama128 llama512` with it ran past one call's 600 s.
# e.g. call 1: h200_generate.sh stash tests llama128   call 2 (at once): h200_generate.sh real llama512
# Logs and JSON rows go to $OUT; every bench row runs in a process of its own.
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPOTLIGHT_CACHE_DIR=/root/sacache
mkdir -p "$OUT"
bench() { python3 -m spotlight_attn.cli.main bench decode "$@" 2>&1 | grep -v "Warning\|warnings.warn"; }
for phase in "$@"; do
  log="$OUT/$phase.log"
  case $phase in
  stash) mkdir -p /root/xfer && cp .model/a/part1 /root/xfer/ && echo "part1 stashed" ;;
  tests)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_static.py tests/test_hasher.py 2>&1 | tail -n 15
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 15  # compiled on CUDA here
    } 2>&1 | tee "$log" ;;
  llama128)
    bench --shape llama3-8b --context 128K --batch 6 --budget 0.02 --hasher linear,mlp --baselines "${LLAMA_BASELINES:-hf-static,dense}" \
        --json "$OUT/llama3_128k_x6.json" | tee "$log" ;;
  dl0)
    { bench --shape llama3-8b --context 128K --batch 6 --budget 0.02 --hasher mlp --baselines '' --dense-layers 0 \
          --json "$OUT/llama3_128k_x6_dl0.json"
      bench --shape llama3-8b --context 512K --batch 1 --budget 0.02 --hasher mlp --baselines '' --dense-layers 0 \
          --json "$OUT/llama3_512k_x1_dl0.json"; } | tee "$log" ;;
  freeze128|freeze512)
    shape="--context 128K --batch 6"; name=llama3_128k_x6; [ $phase = freeze512 ] && shape="--context 512K --batch 1" && name=llama3_512k_x1
    TORCHINDUCTOR_FREEZING=1 bench --shape llama3-8b $shape --budget 0.02 --hasher mlp --baselines dense \
        --json "$OUT/${name}_freeze.json" | tee "$log" ;;
  unfused128|unfused512)
    shape="--context 128K --batch 6"; name=llama3_128k_x6; [ $phase = unfused512 ] && shape="--context 512K --batch 1" && name=llama3_512k_x1
    bench --shape llama3-8b $shape --budget 0.02 --hasher linear,mlp --baselines dense --no-fuse-projections \
        --json "$OUT/${name}_unfused.json" | tee "$log" ;;
  guess128|guess512)
    b=${GUESS_BATCH:-6}; shape="--context 128K --batch $b"; name=llama3_128k_x$b
    [ $phase = guess512 ] && shape="--context 512K --batch 1" && name=llama3_512k_x1
    baselines=dense; [ "${GUESS_DENSE:-1}" = 0 ] && baselines=''
    for setting in ${GUESS_ROWS:-bands 0 exact}; do
      SPOTLIGHT_SELECT_GUESS=$setting bench --shape llama3-8b $shape --budget 0.02 --hasher mlp --baselines "$baselines" \
          --json "$OUT/${name}_guess_$setting.json" | sed "s/mlp 2%/mlp 2% guess=$setting/"
      baselines=''
    done | tee "$log" ;;
  torch128)
    SPOTLIGHT_FUSED_HASH=0 bench --shape llama3-8b --context 128K --batch 6 --budget 0.02 --hasher linear,mlp \
        --baselines dense --json "$OUT/llama3_128k_x6_torch_hash.json" | tee "$log" ;;
  llama512)
    bench --shape llama3-8b --context 512K --batch 1 --budget 0.02 --hasher linear,mlp --baselines dense \
        --json "$OUT/llama3_512k_x1.json" | tee "$log" ;;
  real)
    [ -f /root/smollm2.gguf ] || { [ -f /root/xfer/part1 ] || { echo "machine was recycled: redo call 1"; exit 3; }
        cat /root/xfer/part1 .model/b/part2 > /root/smollm2.gguf; }
    echo "$(cat .model/b/sha256)  /root/smollm2.gguf" | sha256sum -c - || exit 4
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
    bench --model /root/smollm2.gguf --context 8000 --batch 1,32 --budget 0.1 --hasher learned --baselines "${REAL_BASELINES:-hf-static,dense}" \
        --json "$OUT/real_smollm2.json" | tee "$log" ;;
  profile|profile512)
    shape="--context 128K --batch 6"; [ $phase = profile512 ] && shape="--context 512K --batch 1"
    python3 benchmarks/profile_generate.py --shape llama3-8b $shape --out "$OUT/$phase" 2>&1 \
        | grep -v "Warning\|warn\|STAGE\|profiler_st\|USDT" | tee "$log"
    tar czf "$OUT/$phase.tgz" -C "$OUT" "$phase" && rm -rf "${OUT:?}/$phase" ;;  # a call brings back 8 files at most
  ncu)
    ncu --clock-control none --kernel-name regex:"_hash|_score|_select|_refine|_emit|_sparse" --launch-skip 4 --launch-count 4 \
        --set detailed --section SourceCounters --section WarpStateStats python3 benchmarks/ncu_probe.py > "$OUT/ncu.txt" 2>&1
    grep -E "^  _|Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Compute \(SM\) Throughput" "$OUT/ncu.txt" | tee "$log" ;;
  retrieval)
    python3 -m spotlight_attn.cli.main bench retrieval --geometry llama3-8b --context 128K,512K,1M --batch 1,8 \
        --json "$OUT/retrieval.json" 2>&1 | grep -v "Warning\|warn" | tee "$log" ;;
  gemm) python3 benchmarks/gemm_probe.py ${GEMM_AUTOTUNE:+--autotune} --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tee "$log" ;;
  hash) python3 -m pytest -q -p no:cacheprovider tests/test_hash_kernel.py 2>&1 | tail -n 3 | tee "$log" ;;
  check) python3 benchmarks/select_check.py 2>&1 | tail -n 1 | tee "$log" ;;
  train)
    { python3 benchmarks/train_throughput.py --out "$OUT" 2>&1 | grep -v "Warning\|warn"
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py 2>&1 | tail -n 3
    } | tee "$log" ;;
  tune) python3 benchmarks/tune_kernels.py --cases generate ${TUNE_ONLY:+--only $TUNE_ONLY} --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -n 25 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
