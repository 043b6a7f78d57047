#!/usr/bin/env bash
# Hash training at scale and the quality evaluation, on the GPU machine with the real SmolLM2-135M
# (issue 14; docs/RESULTS.md, docs/TRAINING.md). Phases run in the order given:
#   stash    call 1 (carry .model/a .packs/a): the GGUF's first half and half the training pack to /root/xfer
#   probe    the streaming trainer's speed at the SmolLM2 shape (random weights), alone and 4 at once
#   model    call 2 (carry .model/b .whl .packs/b): assemble the GGUF, install gguf, copy the eval packs and the training pack's other half
#   train    train the VARIANTS side by side (one process each), STEPS steps per layer, then store each in float16
#   select   retrieval of every variant (and the shipped hasher) on held-out documents of the training sources;
#            the best 128-bit one by mean attention mass over 10% and 2% becomes /root/hashers/best.safetensors
#   eval     the quality suite on the held-out domains (kjv, perl-docs, elisp: never trained on), processes side by side
# Packs (docs/CORPORA.md): .packs/a/train-mix-8k.part0.safetensors, .packs/b/train-mix-8k.part1.safetensors (benchmarks/split_pack.py), .packs/b/{kjv,perl-docs,elisp}-{4096,4112,2048}.safetensors,
# .packs/b/valid-4112.safetensors. Everything written goes to $OUT; the hashers also stay in /root/hashers
# while the machine is warm, so call 3 (eval) must follow call 2 at once.
set -uo pipefail
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPOTLIGHT_CACHE_DIR=/root/sacache
M=/root/smollm2.gguf H=/root/hashers P=/root/packs
STEPS=${STEPS:-960}
VARIANTS=${VARIANTS:-"pairs list mix w128 b64"}
mkdir -p "$OUT" $H
sp() { python3 -m spotlight_attn.cli.main "$@"; }
quiet() { grep -v "Warning\|warnings.warn\|it/s\]$\|chunk/s\]$\|task/s\]$\|prompt/s\]$"; }
flags() {  # training flags of a variant
  case $1 in
  pairs) echo "" ;;
  list) echo "--listwise 1" ;;
  mix) echo "--listwise 0.5" ;;
  w128) echo "--width 128" ;;
  b64) echo "--bits 64" ;;
  *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
for phase in "$@"; do
  case $phase in
  stash) mkdir -p /root/xfer && cp .model/a/part1 .packs/a/train-mix-8k.part0.safetensors /root/xfer/ && ls -la /root/xfer ;;
  probe)
    { python3 benchmarks/train_throughput.py --shape smollm2-135m --batches 6 --out "$OUT/probe1" 2>&1 | tail -n 4
      for i in 1 2 3 4; do python3 benchmarks/train_throughput.py --shape smollm2-135m --batches 6 --out "$OUT/probe4_$i" > "$OUT/probe4_$i.log" 2>&1 & done; wait
      tail -n 2 "$OUT"/probe4_*.log
    } 2>&1 | quiet | tee "$OUT/probe.log" ;;
  model)
    [ -f $M ] || { [ -f /root/xfer/part1 ] || { echo "machine was recycled: redo call 1"; exit 3; }
        cat /root/xfer/part1 .model/b/part2 > $M; }
    echo "$(cat .model/b/sha256)  $M" | sha256sum -c - || exit 4
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    mkdir -p $P && cp .packs/b/*.safetensors $P/ && mv $P/train-mix-8k.part1.safetensors /root/xfer/ && ls $P /root/xfer ;;
  train)
    { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      start=$(date +%s)
      for v in $VARIANTS; do
        sp train --model $M --data /root/xfer/train-mix-8k.part0.safetensors /root/xfer/train-mix-8k.part1.safetensors --chunk-len 8192 --chunks "${CHUNKS:-481}" --steps "$STEPS" \
            --dense-layers 0 --device cuda --checkpoint-every 100 --out $H/$v.safetensors $(flags $v) > "$OUT/train_$v.log" 2>&1 &
      done
      wait
      echo "trained $VARIANTS in $(( $(date +%s) - start )) s"
      for v in $VARIANTS; do tail -n 2 "$OUT/train_$v.log"; done
      python3 - "$H" $VARIANTS <<'EOF'
import sys
from spotlight_attn.hashing import load_hasher, read_header, save_hasher
from spotlight_attn.models import ModelGeometry
folder, names = sys.argv[1], sys.argv[2:]
for name in names:
    path = f"{folder}/{name}.safetensors"
    hasher = load_hasher(path, ModelGeometry(**read_header(path)["model"]))
    save_hasher(hasher.half(), f"{folder}/{name}.fp16.safetensors", training=hasher.training_info)
    print("float16:", f"{folder}/{name}.fp16.safetensors")
EOF
      mkdir -p "$OUT/hashers" && cp $H/*.fp16.safetensors "$OUT/hashers/" && cp -r $H/*.logs "$OUT/hashers/" 2>/dev/null
    } 2>&1 | quiet | tee "$OUT/train.log" ;;
  select)
    { mkdir -p "$OUT/select"
      for v in shipped $VARIANTS; do
        file=$H/$v.fp16.safetensors; [ $v = shipped ] && file=src/spotlight_attn/assets/smollm2-135m.safetensors
        sp eval retrieval --model $M --device cuda --data $P/valid-4112.safetensors --split heldout --contexts 4096 --steps 16 \
            --chunks 9 --methods spotlight=$file --budgets 0.1,0.02 --out "$OUT/select/$v.json" > "$OUT/select/$v.log" 2>&1 &
      done
      sp eval retrieval --model $M --device cuda --data $P/valid-4112.safetensors --split heldout --contexts 4096 --steps 16 \
          --chunks 9 --methods oracle,linear128,linear1024 --budgets 0.1,0.02 --out "$OUT/select/baselines.json" > "$OUT/select/baselines.log" 2>&1 &
      wait
      python3 - "$OUT/select" "$H" $VARIANTS <<'EOF'
import json, shutil, sys
folder, hashers, names = sys.argv[1], sys.argv[2], sys.argv[3:]
best = None
for name in ["baselines", "shipped", *names]:
    rows = json.load(open(f"{folder}/{name}.json"))["rows"]
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        mass = sum(r["mass"] for r in mine) / len(mine)
        print(f"{name:10s} {method:10s} " + "  ".join(f"{r['budget']:g}: IoU {r['iou']:.3f} mass {r['mass']:.4f}" for r in mine)
              + f"  mean mass {mass:.4f}")
        if method == "spotlight" and name != "b64" and (best is None or mass > best[1]):
            best = (name, mass)
print("best 128-bit hasher on the validation documents:", best[0])
src = "src/spotlight_attn/assets/smollm2-135m.safetensors" if best[0] == "shipped" else f"{hashers}/{best[0]}.fp16.safetensors"
shutil.copy(src, f"{hashers}/best.safetensors")
open(f"{folder}/best.txt", "w").write(best[0] + "\n")
EOF
    } 2>&1 | quiet | tee "$OUT/select.log" ;;
  eval)
    Q="$OUT/quality"; mkdir -p "$Q"; best=$H/best.safetensors; start=$(date +%s)
    [ -f $best ] || { echo "no $best: run train and select first"; exit 5; }
    common="--model $M --device cuda --budgets 0.1,0.02"
    for d in kjv perl-docs elisp; do
      { sp eval retrieval $common --data $P/$d-4112.safetensors --contexts 4096 --steps 16 --chunks 12 --hasher $best \
            --methods oracle,spotlight,linear128,linear1024,quest,streaming --out "$Q/retrieval_$d.json"
        sp eval ppl $common --data $P/$d-4096.safetensors --chunks 24 --hasher $best \
            --methods dense,oracle,spotlight,linear128,linear1024,quest,streaming --out "$Q/ppl_$d.json"
      } > "$Q/$d.log" 2>&1 &
    done
    sp eval needle $common --hasher $best --kinds passkey --lengths 4096 --depths 0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95 \
        --seeds 0,1,2,3 --methods dense,oracle,spotlight,linear1024 --out "$Q/needle.json" > "$Q/needle.log" 2>&1 &
    sp eval fidelity $common --hasher $best --data $P/kjv-2048.safetensors --length 2048 --prompts 32 \
        --methods dense,oracle,spotlight,linear1024 --out "$Q/fidelity_kjv.json" > "$Q/fidelity.log" 2>&1 &
    { for d in kjv perl-docs; do  # one dense layer instead of two (issue 13, item 3)
        sp eval ppl $common --data $P/$d-4096.safetensors --chunks 24 --hasher $best --dense-layers 0 \
            --methods oracle,spotlight --out "$Q/ppl_${d}_dense1.json"
      done
      sp eval retrieval $common --data $P/kjv-4112.safetensors --contexts 4096 --steps 16 --chunks 12 --hasher $best \
          --dense-layers 0 --methods oracle,spotlight --out "$Q/retrieval_kjv_dense1.json"
    } > "$Q/dense1.log" 2>&1 &
    [ -f $H/b64.fp16.safetensors ] && { for d in kjv perl-docs; do  # the 64-bit moonshot against SimHash-1024's rows above
        sp eval retrieval $common --data $P/$d-4112.safetensors --contexts 4096 --steps 16 --chunks 12 \
            --hasher $H/b64.fp16.safetensors --methods spotlight --out "$Q/retrieval_${d}_b64.json"
        sp eval ppl $common --data $P/$d-4096.safetensors --chunks 24 --hasher $H/b64.fp16.safetensors \
            --methods spotlight --out "$Q/ppl_${d}_b64.json"
      done > "$Q/b64.log" 2>&1 & }
    wait
    echo "eval took $(( $(date +%s) - start )) s"
    for f in "$Q"/*.log; do echo "== $f"; grep -v "Warning\|warn\|/s\]" "$f" | grep "^|\|took\|Error\|error" | head -n 40; done ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
