"""Hasher training variants on three layers (3, 13, 23) of SmolLM2-135M, against the shipped hasher.

    OMP_NUM_THREADS=1 python benchmarks/hasher_variants.py [--variants NAME ...]

Trains, with the shipped recipe otherwise (400 steps, 8 x 4096 stdlib tokens, gain 8, queries past
position 1024): `depth4` (four residual blocks instead of two) and `realq_trained` (the loss scores
the real-valued query hash against soft key codes, the scoring `metrics --real-query` measures);
`chunks16` (16 training chunks instead of 8); `pydocs` (the Python docs' prose instead of code);
`stdlib_pydocs` (8 chunks of each); `list`, `list_wide`, `list_deep`: the listwise loss alone (the shipped
hasher's loss) at the shipped shape, at hidden width 128, and with four blocks, on 2 chunks each of 4 sources;
`list_scale0.5` ... `list_scale3`, `list_gain4`, `list_gain16`: `list` with the draft softmax's scale at 0.5-3
(4 in `list`) or the soft sign's gain at 4 or 16 (8 in `list`); `list64`, `list64_scale2`: `list` at 64 bits,
at scale 4 and 2; `list_pow0.25` ... `list_pow2`: `list_scale2` with its target, the attention, raised
to that power and renormalised; `list_long`, `list_scale2_long`: `list` and `list_scale2` with 960 steps over 8 chunks
of each source (32 x 4096 tokens); `list_scale2_wide`, `list_scale2_deep`: `list_scale2` at width 128, or with 4 blocks;
`list_scale2_q128`, `list_scale2_bf16`: `list_scale2` with 128 sampled queries a step (the CLI's default; 256 here), or
trained on the model in bfloat16 (as `spotlight train` on CUDA); `list_scale2_q512`: 512 queries a step;
`list_scale2_8k`: the same 32K tokens as 4 chunks of 8192 (the GPU recipe's chunk length). `--simhash 1024` adds SimHash references; `--reuse` evaluates the hashers an earlier run
left in hasher-variants/ instead of training them again.
Trained with the streaming trainer (only LAYERS train; the forward still reads every layer). The
figures in docs/TRAINING.md came from the earlier, spilling trainer, whose data order differs. Prints IoU / mass on held-out KJV (4 x 4096 tokens, 32 queries per
chunk past position 2048) at 10% and 2%, each hasher scored by Hamming and by real-valued query.
About 30 min on one CPU core. Figures in docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

import spotlight_attn.train.loss as loss_module
from spotlight_attn.config import PairSampling, TrainConfig
from spotlight_attn.data import load_chunks
from spotlight_attn.hashing import LinearHasher, load_hasher
from spotlight_attn.metrics import evaluate_retrieval, format_table
from spotlight_attn.models import ModelGeometry, load_model
from spotlight_attn.train import train_hasher

LAYERS = [3, 13, 23]
CHUNK_LEN = {"list_scale2_8k": 8192}  # training chunk length where not 4096 (the GPU recipe's 8192; scored at 4096 like the rest)
BF16 = {"list_scale2_bf16"}  # trained on the model in bfloat16, as `spotlight train` on CUDA does (scored in float32 like the rest)
SHIPPED = "src/spotlight_attn/assets/smollm2-135m.safetensors"
soft_codes = loss_module.soft_codes


def real_query_codes(hasher, layer, queries, keys, sampling):
    """The training codes with the query hash left real-valued (keys keep their soft sign)."""
    _, soft_keys = soft_codes(hasher, layer, queries, keys, sampling)
    return hasher.hash_queries(layer, queries[None])[0], soft_keys


MIX = ["stdlib", "pydocs", "manpages", "linux-doc"]
LISTWISE = PairSampling(gain=8.0, min_position=1024, listwise=1.0, list_scale=4.0)  # the shipped hasher's loss
VARIANTS = {  # name: (TrainConfig overrides, training codes, training corpora, chunks from each)
    "depth4": (dict(depth=4), soft_codes, ["stdlib"], 8),
    "realq_trained": ({}, real_query_codes, ["stdlib"], 8),
    "chunks16": ({}, soft_codes, ["stdlib"], 16),
    "pydocs": ({}, soft_codes, ["pydocs"], 8),
    "stdlib_pydocs": ({}, soft_codes, ["stdlib", "pydocs"], 8),
    # capacity under the listwise loss (the shipped loss): 2 chunks each of code, Python prose, man pages, kernel docs
    "list": (dict(sampling=LISTWISE), soft_codes, MIX, 2),
    "list_wide": (dict(sampling=LISTWISE, width=128), soft_codes, MIX, 2),
    "list_deep": (dict(sampling=LISTWISE, depth=4), soft_codes, MIX, 2),
    # the listwise loss's two sharpness settings: the draft softmax's scale (4 in `list`) and the soft sign's gain (8)
    "list_scale2": (dict(sampling=replace(LISTWISE, list_scale=2.0)), soft_codes, MIX, 2),
    "list_gain4": (dict(sampling=replace(LISTWISE, gain=4.0)), soft_codes, MIX, 2),
    "list_gain16": (dict(sampling=replace(LISTWISE, gain=16.0)), soft_codes, MIX, 2),
    "list_scale3": (dict(sampling=replace(LISTWISE, list_scale=3.0)), soft_codes, MIX, 2),
    "list_scale1.5": (dict(sampling=replace(LISTWISE, list_scale=1.5)), soft_codes, MIX, 2),
    "list_scale1": (dict(sampling=replace(LISTWISE, list_scale=1.0)), soft_codes, MIX, 2),
    "list_scale0.5": (dict(sampling=replace(LISTWISE, list_scale=0.5)), soft_codes, MIX, 2),
    "list64": (dict(sampling=LISTWISE, bits=64), soft_codes, MIX, 2),
    "list64_scale2": (dict(sampling=replace(LISTWISE, list_scale=2.0), bits=64), soft_codes, MIX, 2),
    # the listwise target tempered: attention^power renormalised, at scale 2 (`list_scale2` is power 1)
    "list_pow0.5": (dict(sampling=replace(LISTWISE, list_scale=2.0, list_power=0.5)), soft_codes, MIX, 2),
    "list_pow0.25": (dict(sampling=replace(LISTWISE, list_scale=2.0, list_power=0.25)), soft_codes, MIX, 2),
    "list_pow1.5": (dict(sampling=replace(LISTWISE, list_scale=2.0, list_power=1.5)), soft_codes, MIX, 2),
    "list_pow2": (dict(sampling=replace(LISTWISE, list_scale=2.0, list_power=2.0)), soft_codes, MIX, 2),
    # capacity at scale 2: do a wider or deeper hash's gains (at scale 4: list_wide, list_deep) add to scale 2's?
    "list_scale2_wide": (dict(sampling=replace(LISTWISE, list_scale=2.0), width=128), soft_codes, MIX, 2),
    "list_scale2_deep": (dict(sampling=replace(LISTWISE, list_scale=2.0), depth=4), soft_codes, MIX, 2),
    # what the GPU recipe does differently: 128 sampled queries a step (the CLI's default; 256 here), a bfloat16 frozen model
    "list_scale2_q128": (dict(sampling=replace(LISTWISE, list_scale=2.0, num_queries=128)), soft_codes, MIX, 2),
    "list_scale2_bf16": (dict(sampling=replace(LISTWISE, list_scale=2.0)), soft_codes, MIX, 2),
    "list_scale2_q512": (dict(sampling=replace(LISTWISE, list_scale=2.0, num_queries=512)), soft_codes, MIX, 2),
    "list_scale2_8k": (dict(sampling=replace(LISTWISE, list_scale=2.0)), soft_codes, MIX, 1),  # 1 chunk of 8192 a source
    # does scale 2's lead over 4 survive more steps over more text? 960 steps over 8 chunks of each source (32 x 4096)
    "list_long": (dict(sampling=LISTWISE, steps=960), soft_codes, MIX, 8),
    "list_scale2_long": (dict(sampling=replace(LISTWISE, list_scale=2.0), steps=960), soft_codes, MIX, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["depth4", "realq_trained"])
    parser.add_argument("--reuse", action="store_true",
                        help="load a variant's hasher-variants/NAME.safetensors where an earlier run of this script left it, instead of training")
    parser.add_argument("--simhash", type=int, nargs="*", default=[], metavar="BITS",
                        help="SimHash references of these widths beside the shipped hasher (e.g. 1024)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    recipe = dict(steps=400, sampling=PairSampling(gain=8.0, min_position=1024))
    hashers = {}
    for name in args.variants:
        overrides, codes, corpora, num_chunks = VARIANTS[name]
        out = Path("hasher-variants") / f"{name}.safetensors"
        if args.reuse and out.is_file():
            hashers[name] = load_hasher(out, model)
            print(f"reused {out}", flush=True)
            continue
        # the training chunks as `spotlight train --data ...` cuts them
        chunks = torch.cat([load_chunks(spec, tokenizer, CHUNK_LEN.get(name, 4096), num_chunks, split="train", seed=0) for spec in corpora])
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        loss_module.soft_codes = codes  # ranking_loss looks soft_codes up in its module
        start = time.perf_counter()
        try:
            frozen = load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16)[0] if name in BF16 else model
            train_hasher(frozen, chunks, out, device="cpu", config=TrainConfig(**{**recipe, **overrides}), layers=LAYERS, progress=False)
        finally:
            loss_module.soft_codes = soft_codes
        print(f"train {name}: {time.perf_counter() - start:.0f} s", flush=True)
        hashers[name] = load_hasher(out, model)
    hashers["shipped"] = load_hasher(SHIPPED, model)
    for bits in args.simhash:
        hashers[f"simhash{bits}"] = LinearHasher(ModelGeometry.from_model(model), bits=bits, layers=LAYERS)
    heldout = load_chunks("kjv", tokenizer, 4096, 4, split="all")
    results = evaluate_retrieval(model, heldout, hashers, [0.1, 0.02], LAYERS, 32, 2048, logit=False, real_query=True, progress=False)
    print(format_table(results, LAYERS))


if __name__ == "__main__":
    main()
