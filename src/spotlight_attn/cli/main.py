"""`spotlight`: generate with sparse decoding, or run the offline needle demo.

    spotlight generate --model M [--hasher H] --method quest --budget 10% --prompt "..."
    spotlight demo [--method linear] [--budget 0.1] [--context-tokens 3000]
    spotlight train --model M --data D --out hasher.safetensors [--bits 128] [--steps 300]
    spotlight eval retrieval|ppl|needle|fidelity [--methods dense,oracle,spotlight,...] [--budgets 0.1,0.02]
    spotlight report results/ppl.json ...
    spotlight bench retrieval|attention|decode (GPU)
    spotlight data list|pack|show (corpora, and packed token files for machines without them)
    spotlight calibrate --method spotlight --data manpages,stdlib --out heads.safetensors (head budgets)

The completion goes to stdout and one summary line to stderr, so the text pipes cleanly.
Bad input (a `SpotlightError`, or a file that cannot be read) ends with one line
`spotlight: error: <message>` on stderr and exit status 2; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

# Only light modules at the top: `spotlight --help` and bad options answer without importing torch
# or transformers (each command imports what it needs when it runs).
from spotlight_attn.config import Method, SpotlightConfig, parse_budget
from spotlight_attn.errors import SpotlightError

logger = logging.getLogger("spotlight_attn.cli")
PROG = "spotlight"
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SpotlightConfig)}
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype of a --dtype choice."""
    import torch

    return getattr(torch, name)


def parse_layers(text: str, flag: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); '' -> (); raises SpotlightError naming `flag` on anything else."""
    try:
        return tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise SpotlightError(f"{flag} {text!r} is not a comma-separated list of layer indices") from None


# The demo reads through the learned hash that ships for smollm2-135m: at budget 0.1 it answered the
# passcode on needle seeds 0-7 (8/8, as dense did; README). `--method linear` uses 256-bit SimHash.
DEMO_METHOD, DEMO_BITS, DEMO_BUDGET = "spotlight", 256, "0.1"


def _config_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """Options that become a SpotlightConfig. Unset ones keep SpotlightConfig's defaults, or `defaults`."""
    shown = {**DEFAULTS, "method": DEFAULTS["method"].value, **defaults}
    parser.add_argument("--method", choices=[m.value for m in Method], default=shown["method"],
                        help="which keys a decode step reads (default: %(default)s)")
    parser.add_argument("--budget", default=str(shown["budget"]),
                        help="keys read per step: a fraction '0.1', a percentage '10%%', or a count '512' (default: %(default)s)")
    parser.add_argument("--hasher", metavar="FILE",
                        help="learned hasher (.safetensors) for --method spotlight (default: the one shipped for the model, if any)")
    for name, meta, text in [
        ("bits", "N", "SimHash bits for --method linear"),
        ("seed", "S", "SimHash projection seed for --method linear"),
        ("page_size", "P", "tokens per page for --method quest"),
        ("sink", "N", "first tokens always read"),
        ("window", "N", "most recent tokens always read"),
        ("min_tokens", "N", "fewest tokens a step reads"),
    ]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, metavar=meta, default=defaults.get(name),
                            help=f"{text} (default: {shown[name]})")
    parser.add_argument("--dense-layers", metavar="I,J",
                        help=f"layers that always read every key, comma-separated, '' for none (default: {','.join(map(str, shown['dense_layers']))})")
    parser.add_argument("--head-budgets", metavar="FILE",
                        help="share the budget over (layer, KV head) by this profile (`spotlight calibrate`) instead of evenly")


def _model_args(parser: argparse.ArgumentParser, model: str | None) -> None:
    parser.add_argument("--model", required=model is None, default=model,
                        help="local HF folder, .gguf file, or the alias smollm2-135m" + (" (default: %(default)s)" if model else ""))
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: the accelerator if any, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="-v: progress, -vv: debug")
    parser = argparse.ArgumentParser(prog=PROG, description="Spotlight Attention: learned-hash KV cache retrieval for long-context decoding.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress, -vv: debug")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", parents=[verbose], help="generate a completion with sparse decoding")
    _model_args(gen, None)
    _config_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: %(default)s)")
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, without the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, metavar="T", help="with --sample (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.9, metavar="P", help="with --sample (default: %(default)s)")
    gen.add_argument("--gen-seed", type=int, default=0, metavar="S", help="with --sample: torch seed (default: %(default)s)")
    gen.set_defaults(run=cmd_generate)

    demo = commands.add_parser("demo", parents=[verbose], help="offline needle-in-a-haystack demo: dense vs. retrieval")
    _model_args(demo, "smollm2-135m")
    _config_args(demo, method=DEMO_METHOD, budget=DEMO_BUDGET, bits=DEMO_BITS)
    demo.add_argument("--context-tokens", type=int, default=3000, metavar="N", help="prompt length (default: %(default)s)")
    demo.add_argument("--depth", type=float, default=0.5, help="where the passcode sits, 0..1 (default: %(default)s)")
    demo.add_argument("--needle-seed", type=int, default=0, metavar="S", help="picks the passcode and the filler (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="(default: %(default)s)")
    demo.set_defaults(run=cmd_demo)

    from spotlight_attn.cli import bench_cmd, calibrate_cmd, data_cmd, eval_cmd, train_cmd

    train_cmd.add_parser(commands)
    eval_cmd.add_parser(commands, parents=[verbose])
    bench_cmd.add_parser(commands)
    data_cmd.add_parser(commands, parents=[verbose])
    calibrate_cmd.add_parser(commands, parents=[verbose])
    return parser


def spotlight_config(args: argparse.Namespace) -> SpotlightConfig:
    """The SpotlightConfig the options describe; raises SpotlightError on a bad value."""
    kwargs = {"method": args.method, "budget": parse_budget(args.budget)}
    for name in ("bits", "seed", "page_size", "sink", "window", "min_tokens"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.dense_layers is not None:
        kwargs["dense_layers"] = parse_layers(args.dense_layers, "--dense-layers")
    if getattr(args, "head_budgets", None) is not None:
        kwargs["head_budgets"] = args.head_budgets
    config = SpotlightConfig(**kwargs)
    if args.hasher is not None and not Path(args.hasher).is_file():
        raise SpotlightError(f"hasher file not found: {args.hasher}")
    if config.head_budgets is not None and not Path(config.head_budgets).is_file():
        raise SpotlightError(f"head budget profile not found: {config.head_budgets}")
    return config


def _load(args: argparse.Namespace, config: SpotlightConfig):
    """(model, tokenizer, hasher or None) for the options. --method spotlight without --hasher takes the
    shipped hasher whose recorded model identity matches the loaded model (hashing/shipped.py)."""
    from spotlight_attn.hashing import load_hasher, shipped_hasher
    from spotlight_attn.models import load_model

    model, tokenizer = load_model(args.model, dtype=torch_dtype(args.dtype), device=args.device)
    if config.method is Method.SPOTLIGHT and args.hasher is None:
        shipped = shipped_hasher(model)
        if shipped is None:
            from spotlight_attn.hashing.shipped import describe_shipped

            raise SpotlightError(
                f"method 'spotlight' needs --hasher FILE (a learned hasher, see `spotlight train`): none ships for "
                f"the model {args.model!r} (shipped: {describe_shipped()}); methods that need none: dense, oracle, "
                "linear, quest, streaming"
            )
        args.hasher = str(shipped)
    hasher = load_hasher(args.hasher, model, device=model.device) if args.hasher else None
    return model, tokenizer, hasher


def _check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise SpotlightError(
            f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens exceeds the model's context of {limit}"
        )


def _budget_text(config: SpotlightConfig) -> str:
    if config.method is Method.DENSE:
        return "none (dense reads every key)"
    if isinstance(config.budget, float):
        return f"{config.budget * 100:g}% of the cache"
    return f"{config.budget} token" + ("" if config.budget == 1 else "s")


def _decode_text(result) -> str:
    """The decode timing of a Generation: the steady-state step, and the first step (warm-up) apart."""
    if not result.step_seconds:
        return "decode: fewer than 2 new tokens, not timed"
    return (
        f"decode {result.decode_ms_per_token:.1f} ms/token (median of {len(result.step_seconds)} steps; "
        f"the first took {result.first_step_ms:.1f} ms, one-time warm-up included)"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from spotlight_attn.attention import enable
    from spotlight_attn.demo import encode_chat, generate_timed

    config = spotlight_config(args)
    if args.prompt_file is not None:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1:
        raise SpotlightError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer, hasher = _load(args, config)
    enable(model, hasher, config)
    sampling = {"do_sample": False}
    if args.sample:
        import torch

        torch.manual_seed(args.gen_seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    inputs = encode_chat(tokenizer, prompt, chat=not args.no_chat)
    _check_length(model, inputs["input_ids"].shape[1], args.max_new_tokens)
    result = generate_timed(model, tokenizer, inputs, max_new_tokens=args.max_new_tokens, **sampling)
    print(result.text, flush=True)
    print(
        f"[{PROG}] prompt {result.prompt_tokens} tokens | new {result.new_tokens} tokens | {result.seconds:.2f} s "
        f"(prefill {result.prefill_seconds:.2f} s, {_decode_text(result)}) | method {config.method.value} | "
        f"budget {_budget_text(config)} | read {result.read_fraction:.1%} of the cache per decode step",
        file=sys.stderr,
        flush=True,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from spotlight_attn.attention import disable, enable
    from spotlight_attn.demo import QUESTION, build_needle_prompt, encode_chat, generate_timed

    config = spotlight_config(args)
    model, tokenizer, hasher = _load(args, config)
    messages, answer = build_needle_prompt(tokenizer, args.context_tokens, seed=args.needle_seed, depth=args.depth)
    inputs = encode_chat(tokenizer, messages)
    _check_length(model, inputs["input_ids"].shape[1], args.max_new_tokens)
    print(
        f"Needle demo: {args.model}, a {inputs['input_ids'].shape[1]}-token prompt of Python's reference docs "
        f"with the passcode {answer} hidden at depth {args.depth:.0%}.\nQuestion: {QUESTION}\n",
        flush=True,
    )
    label = config.method.value + (f" ({config.bits} bits)" if config.method is Method.LINEAR else "")
    if hasher is not None:
        label += f" ({hasher.bits}-bit learned hash {Path(args.hasher).name})"
    dense_layers = ",".join(map(str, config.dense_layers)) or "none"
    runs = [("dense (the model's own attention)", None), (f"{label}, budget {_budget_text(config)}, dense layers {dense_layers}", config)]
    for name, run_config in runs:
        if run_config is None:
            disable(model)  # the model's own attention: the reference answer
        else:
            enable(model, hasher, run_config)
        logger.info("answering with %s", name)
        result = generate_timed(model, tokenizer, inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        verdict = "correct" if answer in result.text else "WRONG"
        print(
            f"{name}\n  answer: {result.text.strip()!r} -> {verdict}\n"
            f"  read {result.read_fraction:.1%} of the cache per decode step | prefill {result.prefill_seconds:.2f} s | "
            f"{_decode_text(result)}",
            flush=True,
        )
    disable(model)
    if model.device.type == "cpu":
        print("(On the CPU every selector runs its pure-torch reference; the decode speed-up needs the GPU kernels.)")
    return 0


def _setup_logging(verbose: int) -> None:
    """One handler on the package logger, to the current stderr; WARNING, -v INFO, -vv DEBUG."""
    package = logging.getLogger("spotlight_attn")
    for handler in [h for h in package.handlers if getattr(h, "_spotlight_cli", False)]:
        package.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler._spotlight_cli = True
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    if not verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every load
        transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    _setup_logging(verbose)
    try:
        return args.run(args)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 1
    except (SpotlightError, OSError) as err:
        if verbose:
            logger.exception("traceback")
        message = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
