#!/usr/bin/env bash
# Hash training at scale and the quality evaluation, on the GPU machine with the real SmolLM2-135M
# (issue 14; docs/RESULTS.md, docs/TRAINING.md). Phases run in the order given:
#   stash    call 1 (carry .model/a): the GGUF's first half to /root/xfer, and the packs the call carries (see packs)
#   packs    call 3 (carry .packs/a .packs/b, and .packs/c for long2c): the training halves to /root/xfer, the eval
#            packs to $P. The tracked tree (15.7 MiB) beside a model half (46.9) leaves no room for the packs in calls 1-2
#   probe    the streaming trainer's speed at the SmolLM2 shape (random weights), alone and 4 at once
#   model    call 2 (carry .model/b .whl): assemble the GGUF, install gguf, and copy the packs the call carries (see packs)
#   train    train the VARIANTS side by side (one process each, detached), STEPS steps per layer, then store each in
#            float16. TRAIN_WAIT_S=540 returns after 540 s if they are still running (exit 6, later phases skipped):
#            the same train phase in the next call (at once, the machine warm) waits for them instead of starting again
#   wording  dense alone on the needle kinds at 4096 and 2048 tokens (40 tasks each): where dense answers >= 90%
#   select   retrieval of every variant (and the name=file hashers in CANDIDATES) on held-out documents of the training
#            sources; the best 128-bit one by mean attention mass over 10% and 2% becomes /root/hashers/best.safetensors
#   eval     the quality suite on held-out domains never trained on (kjv, perl-docs): perplexity over 16 chunks,
#            needle (NEEDLE_KINDS at NEEDLE_LENGTHS, 40 tasks a cell), fidelity over 32 prompts; one process per
#            (methods, budgets) group side by side, merged per evaluation by `spotlight report --merge`
#   dense1   perplexity as in eval with layer 0 alone dense (the shipped hasher holds layers 1-29)
#   mass     attention mass of CANDIDATES and VARIANTS beside SimHash-1024 and the oracle on kjv and perl-docs (8 chunks, 16 steps after
#            4096; the 4112-token packs), one process each, side by side; pair them with benchmarks/paired_retrieval.py
#            (the mass phase and the wide and deep variants are not yet run on a GPU)
#   calibrate  `spotlight calibrate` for each of CALIBRATE (default linear1024) on $P/calib-4112.safetensors (8 train
#            chunks of manpages, as the shipped hasher's profile: `spotlight data pack --model smollm2-135m --data manpages
#            --split train --chunk-len 4112 --chunks 8`), into $OUT/head_budgets and /root/heads (the heads phase reads it there)
#   heads    head budgets (budgets.py) against the even budget on the same chunks: perplexity (PPL_CHUNKS) and
#            attention mass (8 chunks, 16 steps after 4096) on kjv and perl-docs, for the shipped hasher and SimHash-1024,
#            each with the profile `spotlight calibrate` made for it (HEADS_SPOTLIGHT, HEADS_LINEAR)
# docs/RESULTS.md's headline table end to end: `model select eval mass` (after stash and packs; for the shipped
# hasher alone VARIANTS="" with CANDIDATES naming it), the calls' $OUT folders merged into one folder RUN, then
# `python benchmarks/results_md.py --build RUN` writes docs/results/quality_summary.json and the table. Device time
# measured for the parts: select + eval 489 s on the H200, retrieval 90 s (h200_quality2); the mass phase is not timed.
# .packs/c (long2c): the same 11 sources in 4096-token chunks, `spotlight data pack --model smollm2-135m --chunk-len 4096
# --split train --chunks 220 --data licenses,pydocs,linux-doc,python-docs,debian-docs,manpages,postgres-docs,git-docs,stdlib,go,rust
# --out train-mix-4k.safetensors` (1922 chunks, 7.87M tokens, 13 s), then `python benchmarks/split_pack.py train-mix-4k.safetensors 2`.
# Packs (docs/CORPORA.md): .packs/a/train-mix-8k.part0.safetensors, .packs/b/train-mix-8k.part1.safetensors (benchmarks/split_pack.py), .packs/b/{kjv,perl-docs,elisp}-{4096,4112,2048}.safetensors,
# .packs/b/valid-4112.safetensors. `model` installs every wheel in .whl: gguf, and for fidelity (the GPU machine lacks
# rouge-score, which PyPI has only as an sdist) `pip wheel --no-deps -w .whl rouge-score nltk absl-py` and the wheels
# of what nltk needs (click, joblib, regex: `pip download --python-version 3.12 --only-binary=:all:`). Everything written goes to $OUT; the hashers also stay in /root/hashers
# while the machine is warm, so the calls after `model` must follow each other at once.
set -uo pipefail
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPOTLIGHT_CACHE_DIR=/root/sacache
M=${M:-/root/smollm2.gguf} H=${H:-/root/hashers} P=${P:-/root/packs} DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-960}
VARIANTS=${VARIANTS:-"pairs list mix w128 b64"}
CANDIDATES=${CANDIDATES:-"shipped=src/spotlight_attn/assets/smollm2-135m.safetensors"}  # name=file pairs beside the variants
NEEDLE_KINDS=${NEEDLE_KINDS:-passkey} NEEDLE_LENGTHS=${NEEDLE_LENGTHS:-4096}
DEPTHS=${DEPTHS:-0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95} SEEDS=${SEEDS:-0,1,2,3}  # 40 needle tasks a cell
PPL_CHUNKS=${PPL_CHUNKS:-16} PROMPTS=${PROMPTS:-32}
mkdir -p "$OUT" $H
sp() { python3 -m spotlight_attn.cli.main "$@"; }
# side_by_side NAME KIND ARGS... -- GROUP...: one `spotlight eval KIND ARGS` per GROUP ("methods@budgets"; the
# budgets default to 0.1,0.02), side by side, then merged into $Q/NAME.json
side_by_side() {
  local name=$1 kind=$2; shift 2; local args=()
  while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  local parts=() i=0
  for group in "$@"; do
    i=$((i + 1)); local methods=${group%@*} budgets=0.1,0.02; [ "$group" != "$methods" ] && budgets=${group#*@}
    sp eval "$kind" "${args[@]}" --methods "$methods" --budgets "$budgets" --threads 1 --out "$Q/parts/$name.$i.json" > "$Q/parts/$name.$i.log" 2>&1 &
    parts+=("$Q/parts/$name.$i.json")
  done
  wait
  sp report --merge "$Q/$name.json" "${parts[@]}" | grep -v "^plots:"
}
tables() {  # tables DIR LINES: the tables (and errors) of each log in DIR
  for f in "$1"/*.log; do echo "== $f"; grep "^|\|^merged\|Error\|error" "$f" | head -n "$2"; done
}
quiet() { grep -v "Warning\|warnings.warn\|it/s\]$\|chunk/s\]$\|task/s\]$\|prompt/s\]$"; }
hasher_file() {  # a CANDIDATES name=file pair -> its file; a variant's name -> the float16 file train wrote
  case $1 in *=*) echo "${1#*=}" ;; *) echo "$H/$1.fp16.safetensors" ;; esac
}
copy_packs() {  # whichever of .packs/a, .packs/b and .packs/c this call carries: the training halves to /root/xfer, the eval packs to $P
  mkdir -p /root/xfer $P
  [ ! -d .packs/a ] || cp .packs/a/*.safetensors /root/xfer/ || return 1
  [ ! -d .packs/c ] || cp .packs/c/*.safetensors /root/xfer/ || return 1  # the 4096-token training pack's halves (long2c)
  [ ! -d .packs/b ] || { cp .packs/b/*.safetensors $P/ && { [ ! -f $P/train-mix-8k.part1.safetensors ] || mv $P/train-mix-8k.part1.safetensors /root/xfer/; }; }
}
flags() {  # training flags of a variant
  case $1 in
  pairs) echo "--listwise 0" ;;
  list) echo "--listwise 1 --list-scale 4" ;;
  mix) echo "--listwise 0.5 --list-scale 4" ;;
  w128) echo "--listwise 0 --width 128" ;;
  b64) echo "--listwise 0 --bits 64" ;;
  long) echo "--listwise 1 --list-scale 4 --steps 960 --chunks 480" ;;  # twice the steps, over all 960 chunks of the pack (shipped)
  long2) echo "--listwise 1 --list-scale 2 --steps 960 --chunks 480" ;;  # long with the softer listwise softmax (the default since)
  long64) echo "--listwise 1 --list-scale 2 --steps 960 --chunks 480 --bits 64" ;;  # long2 at 64 bits: the moonshot
  long2q) echo "--listwise 1 --list-scale 2 --steps 960 --chunks 480 --queries 256" ;;  # long2 with 256 queries a step (the CPU probe's)
  long2c) echo "--listwise 1 --list-scale 2 --steps 960 --chunks 480 --chunk-len 4096 --data /root/xfer/train-mix-4k.part0.safetensors /root/xfer/train-mix-4k.part1.safetensors" ;;  # long2 on 4096-token chunks (.packs/c)
  list64) echo "--listwise 1 --list-scale 4 --bits 64" ;;
  scale8) echo "--listwise 1 --list-scale 8" ;;
  wide) echo "--listwise 1 --list-scale 4 --steps 960 --chunks 480 --width 128" ;;  # long with hidden width 128 instead of 64
  deep) echo "--listwise 1 --list-scale 4 --steps 960 --chunks 480 --depth 4" ;;  # long with 4 residual blocks instead of 2
  *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
for phase in "$@"; do
  case $phase in
  stash) mkdir -p /root/xfer && cp .model/a/part1 /root/xfer/ && copy_packs && ls -la /root/xfer ;;
  packs) copy_packs && ls -la /root/xfer $P ;;
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
    copy_packs && ls $P /root/xfer ;;
  train)
    { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      start=$(date +%s); rm -f $H/.training
      for v in $VARIANTS; do  # detached, so a run longer than one call goes on into the next (the machine kept warm)
        pgrep -f -- "--out $H/$v.safetensors" > /dev/null && { echo "$v: still training from an earlier call"; continue; }
        setsid nohup python3 -m spotlight_attn.cli.main train --model $M --data /root/xfer/train-mix-8k.part0.safetensors /root/xfer/train-mix-8k.part1.safetensors \
            --chunk-len 8192 --chunks "${CHUNKS:-481}" --steps "$STEPS" --dense-layers 0 --device cuda --checkpoint-every 100 \
            --out $H/$v.safetensors $(flags $v) >> "$H/train_$v.log" 2>&1 < /dev/null &
      done
      while pgrep -f -- "cli.main train" > /dev/null && [ $(( $(date +%s) - start )) -lt "${TRAIN_WAIT_S:-100000}" ]; do sleep 5; done
      for v in $VARIANTS; do cp "$H/train_$v.log" "$OUT/"; tail -n 2 "$OUT/train_$v.log"; done
      if pgrep -f -- "cli.main train" > /dev/null; then
        echo "still training after ${TRAIN_WAIT_S}s: run the train phase again in the next call, at once"; touch $H/.training; exit 6
      fi
      echo "trained $VARIANTS; this call waited $(( $(date +%s) - start )) s"
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
  wording)
    { W="$OUT/wording"; mkdir -p "$W"
      for kind in passkey single multikey; do for n in 4096 2048; do
        sp eval needle --model $M --device $DEVICE --methods dense --kinds $kind --lengths $n --depths $DEPTHS --seeds 0,1,2,3 \
            --threads 1 --out "$W/$kind-$n.json" > "$W/$kind-$n.log" 2>&1 &
      done; done; wait
      for f in "$W"/*.json; do python3 -c "import json, sys; r = json.load(open(sys.argv[1])); s = [x['score'] for x in r['rows']]; print(sys.argv[1].rsplit('/', 1)[1], f'dense {sum(s) / len(s):.3f} over {len(s)} tasks')" "$f"; done
    } 2>&1 | quiet | tee "$OUT/wording.log" ;;
  select)
    { mkdir -p "$OUT/select"; names=""
      for v in $CANDIDATES $VARIANTS; do
        name=${v%%=*} file=$(hasher_file "$v"); names="$names $name"
        sp eval retrieval --model $M --device cuda --data $P/valid-4112.safetensors --split heldout --contexts 4096 --steps 16 \
            --chunks 9 --methods spotlight=$file --budgets 0.1,0.02 --out "$OUT/select/$name.json" > "$OUT/select/$name.log" 2>&1 &
        echo "$name $file" >> "$OUT/select/files.txt"
      done
      [ -f "$OUT/select/baselines.json" ] || sp eval retrieval --model $M --device cuda --data $P/valid-4112.safetensors --split heldout \
          --contexts 4096 --steps 16 --chunks 9 --methods oracle,linear128,linear1024 --budgets 0.1,0.02 \
          --out "$OUT/select/baselines.json" > "$OUT/select/baselines.log" 2>&1 &
      wait
      python3 - "$OUT/select" "$H" $names <<'EOF'
import json, os, shutil, sys
folder, hashers, names = sys.argv[1], sys.argv[2], sys.argv[3:]
files = dict(line.split() for line in open(f"{folder}/files.txt"))
best = None
for name in ["baselines", *names]:
    if not os.path.exists(f"{folder}/{name}.json"):
        print(f"{name}: no results (see {folder}/{name}.log)")
        continue
    results = json.load(open(f"{folder}/{name}.json"))
    rows, bits = results["rows"], set((results["meta"].get("hasher_bits") or {}).values())
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        mass = sum(r["mass"] for r in mine) / len(mine)
        print(f"{name:10s} {method:10s} " + "  ".join(f"{r['budget']:g}: IoU {r['iou']:.3f} mass {r['mass']:.4f}" for r in mine)
              + f"  mean mass {mass:.4f}" + (f"  ({min(bits)} bits)" if bits and method == "spotlight" else ""))
        if method == "spotlight" and bits == {128} and (best is None or mass > best[1]):
            best = (name, mass)
print("best 128-bit hasher on the validation documents:", best[0])
shutil.copy(files[best[0]], f"{hashers}/best.safetensors")
open(f"{folder}/best.txt", "w").write(f"{best[0]} {files[best[0]]}\n")
EOF
    } 2>&1 | quiet | tee -a "$OUT/select.log" ;;
  eval)
    Q="$OUT/quality"; mkdir -p "$Q/parts"; best=$H/best.safetensors; start=$(date +%s)
    [ -f $best ] || { echo "no $best: run train and select first"; exit 5; }
    common="--model $M --device $DEVICE --hasher $best"
    { for d in kjv perl-docs; do
        side_by_side ppl_$d ppl $common --data $P/$d-4096.safetensors --chunks $PPL_CHUNKS -- dense@0.1 oracle spotlight linear1024 > "$Q/ppl_$d.log" 2>&1 &
      done
      side_by_side needle needle $common --kinds $NEEDLE_KINDS --lengths $NEEDLE_LENGTHS --depths $DEPTHS --seeds $SEEDS \
          -- dense@0.1 oracle@0.1 spotlight@0.1 linear1024@0.1 oracle@0.02 spotlight@0.02 linear1024@0.02 > "$Q/needle.log" 2>&1 &
      side_by_side fidelity_kjv fidelity $common --data $P/kjv-2048.safetensors --length 2048 --prompts $PROMPTS \
          -- dense@0.1 oracle spotlight linear1024 > "$Q/fidelity.log" 2>&1 &
      wait
      echo "eval took $(( $(date +%s) - start )) s"
      tables "$Q" 40
    } 2>&1 | quiet | tee "$OUT/eval.log" ;;
  dense1)  # one dense layer (0) instead of two: perplexity as in eval (issue 13, item 3)
    Q="$OUT/dense1"; mkdir -p "$Q/parts"; best=$H/best.safetensors; [ -f $best ] || best=src/spotlight_attn/assets/smollm2-135m.safetensors
    { for d in kjv perl-docs; do
        side_by_side ppl_${d}_dense1 ppl --model $M --device $DEVICE --hasher $best --dense-layers 0 --data $P/$d-4096.safetensors \
            --chunks $PPL_CHUNKS -- dense@0.1 oracle@0.1 oracle@0.02 spotlight@0.1 spotlight@0.02 > "$Q/ppl_${d}_dense1.log" 2>&1 &
      done; wait
      tables "$Q" 20
    } 2>&1 | quiet | tee "$OUT/dense1.log" ;;
  mass)
    Q="$OUT/mass"; mkdir -p "$Q"; start=$(date +%s)
    { for d in kjv perl-docs; do
        common="--model $M --device $DEVICE --data $P/$d-4112.safetensors --contexts 4096 --steps 16 --chunks 8 --budgets 0.1,0.02"
        sp eval retrieval $common --methods linear1024,oracle --out "$Q/${d}_linear1024.json" > "$Q/${d}_linear1024.log" 2>&1 &
        for v in $CANDIDATES $VARIANTS; do
          name=${v%%=*} file=$(hasher_file "$v")
          sp eval retrieval $common --methods spotlight=$file --out "$Q/${d}_$name.json" > "$Q/${d}_$name.log" 2>&1 &
        done
      done; wait
      for f in "$Q"/*.json; do python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/', 1)[1], '  '.join(f\"{x['budget']:g}: IoU {x['iou']:.3f} mass {x['mass']:.4f}\" for x in r['rows']))" "$f"; done
      echo "mass took $(( $(date +%s) - start )) s"
      grep -l "Error\|error" "$Q"/*.log
    } 2>&1 | quiet | tee "$OUT/mass.log" ;;
  calibrate)
    mkdir -p "$OUT/head_budgets" /root/heads; start=$(date +%s)
    { for m in ${CALIBRATE:-linear1024}; do
        sp calibrate --model $M --device $DEVICE --method $m --data $P/calib-4112.safetensors --split train --chunks 8 \
            --context 4096 --steps 16 --out "$OUT/head_budgets/heads-$m.safetensors" > "$OUT/head_budgets/calibrate-$m.log" 2>&1 &
      done; wait
      for m in ${CALIBRATE:-linear1024}; do grep "^|\|^wrote\|rror" "$OUT/head_budgets/calibrate-$m.log"; done
      cp "$OUT"/head_budgets/*.safetensors /root/heads/
      echo "calibrate took $(( $(date +%s) - start )) s"
    } 2>&1 | quiet | tee "$OUT/calibrate.log" ;;
  heads)
    Q="$OUT/heads"; mkdir -p "$Q/parts"; start=$(date +%s)
    hs=${HEADS_SPOTLIGHT:-docs/results/head_budgets/heads-spotlight-manpages.safetensors}
    hl=${HEADS_LINEAR:-/root/heads/heads-linear1024.safetensors}
    run() { local name=$1; shift; sp eval "$@" --model $M --device $DEVICE --threads 1 --out "$Q/parts/$name.json" > "$Q/parts/$name.log" 2>&1; }
    { for d in kjv perl-docs; do
        ppl="ppl --data $P/$d-4096.safetensors --chunks $PPL_CHUNKS" mass="retrieval --data $P/$d-4112.safetensors --contexts 4096 --steps 16 --chunks 8"
        run ppl_$d.dense $ppl --methods dense --budgets 0.1 &
        run ppl_$d.spotlight $ppl --methods spotlight --head-budgets spotlight=$hs --budgets 0.1,0.02 &
        run ppl_$d.linear $ppl --methods linear1024 --head-budgets linear1024=$hl --budgets 0.1,0.02 &
        run mass_$d.spotlight $mass --methods spotlight --head-budgets spotlight=$hs --budgets 0.1,0.02 &
        run mass_$d.linear $mass --methods linear1024 --head-budgets linear1024=$hl --budgets 0.1,0.02 &
      done; wait
      for d in kjv perl-docs; do
        sp report --merge "$Q/ppl_$d.json" "$Q/parts/ppl_$d.dense.json" "$Q/parts/ppl_$d.spotlight.json" "$Q/parts/ppl_$d.linear.json" | grep -v "^plots:"
        for m in spotlight linear; do sp report "$Q/parts/mass_$d.$m.json" | grep "^|"; done
      done
      echo "heads took $(( $(date +%s) - start )) s"
      grep -l "Error\|error" "$Q"/parts/*.log
    } 2>&1 | quiet | tee "$OUT/heads.log" ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
  [ ! -f $H/.training ] || exit 6  # the train phase left runs going: the later phases need its hashers
done
