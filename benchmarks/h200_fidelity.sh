#!/usr/bin/env bash
# Answer fidelity over 32 prompts per held-out domain (kjv, perl-docs) on the GPU machine, with the real
# SmolLM2-135M and the shipped hasher (issue 14; docs/RESULTS.md). Two device calls, the second at once
# (the machine stays warm 30 s; ../shared/gpu-model.md):
#   call 1 (carry .model/a):                 mkdir -p /root/xfer && cp .model/a/part1 /root/xfer/
#   call 2 (carry .model/b .whl .packs/b):   bash benchmarks/h200_fidelity.sh
# .whl holds the wheels the machine lacks (gguf, rouge-score built with `pip wheel --no-deps`, nltk,
# defusedxml, six); .packs/b the 2048-token packs:
#   spotlight data pack --model smollm2-135m --chunk-len 2048 --split all --chunks 40 --data kjv --out .packs/b/kjv-2048.safetensors
#   (the same with --data perl-docs; Debian's bible-kjv-text and perl-doc must be installed where the packs are made).
# One process per (domain, method, budget), side by side, each with its own dense reference; each is
# stopped 550 s after the call starts, so the merge and the archive still come back.
# Writes $OUT/fidelity_{kjv,perl-docs}.{json,md,png} and $OUT/fidelity_parts.tgz (the parts and logs).
set -uo pipefail
T0=$(date +%s); M=/root/smollm2.gguf; P=/root/packs; Q=$OUT/q; mkdir -p "$Q" $P
[ -f $M ] || { [ -f /root/xfer/part1 ] || { echo "machine was recycled: redo call 1"; exit 3; }; cat /root/xfer/part1 .model/b/part2 > $M; }
echo "$(cat .model/b/sha256)  $M" | sha256sum -c - || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 5
cp .packs/b/kjv-2048.safetensors .packs/b/perl-docs-2048.safetensors $P/ || exit 6
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 SPOTLIGHT_CACHE_DIR=/root/sacache
# Convert the model once, before the processes that all need it start.
python3 -c "import rouge_score.rouge_scorer, gguf; from spotlight_attn.models import resolve_model as r; print(r('$M'))" 2>&1 | tail -n 1
left=$((T0 + 550 - $(date +%s))); echo "setup $(( $(date +%s) - T0 )) s; fidelity gets $left s"; S=$(date +%s)
for d in kjv perl-docs; do
  i=0
  for g in dense,oracle@0.1 oracle@0.02 spotlight@0.1 spotlight@0.02 linear1024@0.1 linear1024@0.02; do
    i=$((i + 1))
    timeout -k 5 $left python3 -m spotlight_attn.cli.main eval fidelity --model $M --device cuda \
      --hasher src/spotlight_attn/assets/smollm2-135m.safetensors --data $P/$d-2048.safetensors --length 2048 \
      --prompts 32 --max-new-tokens 32 --dense-layers 0,1 --methods "${g%@*}" --budgets "${g#*@}" --threads 1 \
      --out "$Q/${d}_$i.json" > "$Q/${d}_$i.log" 2>&1 &
  done
done
wait; echo "fidelity took $(( $(date +%s) - S )) s"
for d in kjv perl-docs; do python3 -m spotlight_attn.cli.main report --merge "$OUT/fidelity_$d.json" "$Q/${d}"_*.json 2>&1 | grep -v "^plots:"; done
for f in "$Q"/*.log; do [ -f "${f%.log}.json" ] || { echo "== no results: $f"; tail -n 4 "$f"; }; done
tar -czf "$OUT/fidelity_parts.tgz" -C "$OUT" q && rm -rf "${Q:?}"; ls -la "$OUT"
