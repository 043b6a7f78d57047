"""The offline needle demo: hide a passcode in a few thousand tokens of local prose, then ask for it.

The filler is the prose of Python's own reference documentation (tasks.filler_paragraphs), which
ships with every CPython installation, so the demo needs no download.

    messages, answer = build_needle_prompt(tokenizer, context_tokens=3000, seed=0)
    result = generate_timed(model, tokenizer, encode_chat(tokenizer, messages), max_new_tokens=24)
    answer in result.text

The library never prints; `spotlight demo` (cli/main.py) runs this and prints the results.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from spotlight_attn import compat
from spotlight_attn.attention import read_fraction
from spotlight_attn.errors import SpotlightError
from spotlight_attn.tasks import filler_paragraphs

INTRO = "A secret passcode is hidden in the text below. Find it."
NEEDLE = "The secret passcode is {code}. Remember it: the passcode is {code}."
QUESTION = "What is the secret passcode?"
SEPARATOR = "\n\n"


def build_needle_prompt(
    tokenizer, context_tokens: int = 3000, seed: int = 0, depth: float = 0.5
) -> tuple[list[dict], str]:
    """A one-turn chat asking for a passcode hidden in ~`context_tokens` tokens of filler.

    Returns (messages, answer): messages is [{"role": "user", "content": ...}] for
    `tokenizer.apply_chat_template`; answer is the 4-digit passcode the reply must contain.
    `seed` picks the passcode and where in the docs the filler starts; `depth` (0..1) is where the
    needle sits, as a fraction of the filler paragraphs. The prompt is about `context_tokens` long
    once the chat template is applied (a paragraph more or less).
    """
    if context_tokens < 1:
        raise SpotlightError(f"context_tokens must be >= 1, got {context_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise SpotlightError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    code = str(rng.randrange(1000, 10000))
    needle = NEEDLE.format(code=code)
    paragraphs = filler_paragraphs()

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    template_overhead = 32  # system prompt and role markers of a typical chat template
    fixed = n_tokens(SEPARATOR.join([INTRO, needle, QUESTION])) + template_overhead
    filler, total, i = [], fixed, rng.randrange(len(paragraphs))
    while total < context_tokens:
        paragraph = paragraphs[i % len(paragraphs)]
        filler.append(paragraph)
        total += n_tokens(paragraph) + 1  # +1: the separator
        i += 1
    filler.insert(round(depth * len(filler)), needle)
    content = SEPARATOR.join([INTRO, *filler, QUESTION])
    return [{"role": "user", "content": content}], code


def encode_chat(tokenizer, messages: list[dict] | str, chat: bool = True) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask [1, T] for a prompt: through the chat template when `chat` and the
    tokenizer has one, else the plain text of the messages joined by blank lines."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        encoded = tokenizer(SEPARATOR.join(m["content"] for m in messages), return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class _StepClock(BaseStreamer):
    """Time stamps of generate()'s pushes: the prompt first, then each new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


@dataclass(slots=True)
class Generation:
    """One timed generate() call on a single prompt."""

    text: str  # the completion, special tokens removed
    prompt_tokens: int
    new_tokens: int
    seconds: float  # the whole generate() call
    prefill_seconds: float  # until the first new token
    read_fraction: float  # mean fraction of the valid cached keys a decode step read (all layers)
    step_seconds: tuple[float, ...] = ()  # each decode step after the first token, in order

    @property
    def decode_ms_per_token(self) -> float:
        """A decode step's steady-state time: the median step (nan with fewer than 2 new tokens). The
        first steps of a process also compile kernels (Triton, once per shape class); the median
        leaves those one-time costs out, and first_step_ms shows them."""
        return statistics.median(self.step_seconds) * 1e3 if self.step_seconds else float("nan")

    @property
    def first_step_ms(self) -> float:
        """The first decode step, one-time warm-up included."""
        return self.step_seconds[0] * 1e3 if self.step_seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def generate_timed(model, tokenizer, inputs: dict[str, torch.Tensor], **generate_kwargs) -> Generation:
    """Run model.generate on one encoded prompt ([1, T]) and time it. Extra kwargs go to generate()."""
    device = next(model.parameters()).device
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    prompt_tokens = inputs["input_ids"].shape[1]
    clock = _StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, return_dict_in_generate=True, streamer=clock, pad_token_id=tokenizer.pad_token_id, **generate_kwargs
        )
    seconds = time.perf_counter() - started
    new_ids = out.sequences[0, prompt_tokens:]
    first_token = clock.stamps[1] if len(clock.stamps) > 1 else started + seconds
    tokens = clock.stamps[1:]  # stamps[0] is the prompt's push
    return Generation(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        prompt_tokens=prompt_tokens,
        new_tokens=int(new_ids.numel()),
        seconds=seconds,
        prefill_seconds=first_token - started,
        read_fraction=read_fraction(compat.output_cache(out)),
        step_seconds=tuple(b - a for a, b in zip(tokens, tokens[1:])),
    )
