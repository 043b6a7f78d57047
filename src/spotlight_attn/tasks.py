"""Needle tasks generated offline: passkey retrieval and RULER-style needle-in-a-haystack variants.

The haystack is the prose of Python's reference documentation (`pydoc_data.topics`, the text
`help()` shows), which ships with every CPython, so nothing is downloaded. Every task is a pure
function of (tokenizer, kind, context length, depth, seed).

Kinds:
- passkey:    one secret passcode (4 digits) in the filler; "What is the secret passcode?"
- single:     one "special magic number" for a named key (RULER niah_single)
- multikey:   four needles with different keys; asked for one of them (RULER niah_multikey)
- multivalue: four numbers for the same key; asked for all of them (RULER niah_multivalue)
- multiquery: four needles with different keys; asked for two of them (RULER niah_multiquery)

A task is one chat turn: the context (instructions + haystack with the needles) then the question;
the assistant's reply starts with an answer prefix ("The pass key is"), as RULER does. Scoring is
RULER's string match: the fraction of the expected answers found in the reply.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

from spotlight_attn.errors import SpotlightError

KINDS = ("passkey", "single", "multikey", "multivalue", "multiquery")
SEPARATOR = "\n\n"
NEEDLES_PER_TASK = 4
_WORDS = (
    "amber", "anchor", "apple", "arrow", "autumn", "badger", "basket", "beacon", "birch", "blossom", "breeze",
    "bronze", "cactus", "canyon", "cedar", "cherry", "cobalt", "comet", "copper", "coral", "crystal", "dagger",
    "desert", "dolphin", "ember", "falcon", "feather", "forest", "garnet", "glacier", "harbor", "hazel", "island",
    "ivory", "jasmine", "lantern", "lemon", "marble", "meadow", "meteor", "nectar", "olive", "orchid", "otter",
    "pebble", "pepper", "pine", "quartz", "raven", "river", "saffron", "sparrow", "spruce", "thunder", "tulip",
    "velvet", "violet", "walnut", "willow", "zephyr",
)


@functools.lru_cache(maxsize=1)
def filler_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python reference docs, in a fixed order (one line each, >= 12 words)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise SpotlightError("the needle tasks' filler text needs the standard library module pydoc_data") from None
    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = block.strip("\n").split("\n")
            # Indented lines are grammar or code; a line of only '*', '=' or '-' underlines a heading.
            if any(line.startswith(" ") for line in lines) or set(lines[-1]) <= set("*=-"):
                continue
            text = " ".join(line.strip() for line in lines)
            lowered = text.lower()
            if len(text.split()) >= 12 and "passcode" not in lowered and "magic number" not in lowered:
                paragraphs.append(text)
    return tuple(paragraphs)


@dataclass(slots=True)
class Task:
    kind: str
    context: str  # instructions + haystack (+ separator): prefilled
    question: str  # decoded token by token through the method under test
    answer_prefix: str  # start of the assistant's reply
    answers: list[str] = field(default_factory=list)  # every one must appear in the reply
    depth: float = 0.5
    seed: int = 0

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.context + self.question}]

    def score(self, reply: str) -> float:
        """RULER string match: fraction of the expected answers found in the reply."""
        return sum(answer in reply for answer in self.answers) / len(self.answers)


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def make_task(tokenizer, kind: str, context_tokens: int, depth: float = 0.5, seed: int = 0) -> Task:
    """A task of `kind` at least `context_tokens` tokens long (chat template included; one filler paragraph
    more at most), its first needle at
    `depth` (0 = start of the haystack, 1 = end); the other needles (multi-needle kinds) sit at
    seeded random depths."""
    if kind not in KINDS:
        raise SpotlightError(f"needle task {kind!r} is not one of {', '.join(KINDS)}")
    if context_tokens < 64:
        raise SpotlightError(f"needle context must be >= 64 tokens, got {context_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise SpotlightError(f"needle depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{kind}:{context_tokens}:{depth}:{seed}")
    keys: set[str] = set()
    values: set[str] = set()
    if kind == "passkey":
        # The wording of the demo (demo.py), which SmolLM2-135M answers reliably at a few thousand tokens.
        code = _number(rng, 4, values)
        intro = "A secret passcode is hidden in the text below. Find it."
        needles = [f"The secret passcode is {code}. Remember it: the passcode is {code}."]
        question, prefix, answers = "What is the secret passcode?", "The secret passcode is", [code]
    else:
        intro = (
            "Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards."
        )
        if kind == "multivalue":
            key = _key(rng, keys)
            answers = [_number(rng, 7, values) for _ in range(NEEDLES_PER_TASK)]
            needles = [_magic(key, v) for v in answers]
            question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
            prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        else:
            count = 1 if kind == "single" else NEEDLES_PER_TASK
            pairs = [(_key(rng, keys), _number(rng, 7, values)) for _ in range(count)]
            needles = [_magic(k, v) for k, v in pairs]
            asked = pairs[:2] if kind == "multiquery" else pairs[:1]
            answers = [v for _, v in asked]
            names = " and ".join(k for k, _ in asked)
            plural = "are all the special magic numbers" if kind == "multiquery" else "is the special magic number"
            question = f"What {plural} for {names} mentioned in the provided text?"
            prefix = f"The special magic number{'s' if kind == 'multiquery' else ''} for {names} mentioned in the provided text {'are' if kind == 'multiquery' else 'is'}"
    paragraphs = filler_paragraphs()

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    bare = Task(kind, SEPARATOR.join([intro, *needles]) + SEPARATOR, question, prefix, answers)
    filler, total, i = [], len(prompt_text_ids(tokenizer, bare)[0]), rng.randrange(len(paragraphs))
    while total < context_tokens:  # an estimate: tokens do not quite add up across paragraph joins
        filler.append(paragraphs[(i + len(filler)) % len(paragraphs)])
        total += n_tokens(filler[-1]) + 1
    others = [rng.random() for _ in needles[1:]]

    def assemble() -> Task:
        # The asked needle goes at `depth`, the others at seeded depths; insert from the back so slots hold.
        haystack = list(filler)
        slots = [round(d * len(filler)) for d in [depth, *others]]
        for slot, needle in sorted(zip(slots, needles), key=lambda pair: -pair[0]):
            haystack.insert(slot, needle)
        return Task(kind, SEPARATOR.join([intro, *haystack]) + SEPARATOR, question, prefix, answers, depth, seed)

    task = assemble()
    while len(prompt_text_ids(tokenizer, task)[0]) < context_tokens:
        filler.append(paragraphs[(i + len(filler)) % len(paragraphs)])
        task = assemble()
    return task


def prompt_text_ids(tokenizer, task: Task) -> tuple[list[int], str]:
    """Token ids and text of the whole prompt: the chat template (if the tokenizer has one) + answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(task.messages(), add_generation_prompt=True, tokenize=False) + task.answer_prefix
    else:
        text = task.context + task.question + SEPARATOR + task.answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"], text


def encode_task(tokenizer, task: Task) -> tuple[list[int], int]:
    """Token ids of the whole prompt (chat template + answer prefix) and where the question starts.

    Tokens before the split are the context (prefilled); from the split on, the question, the
    template's closing markers and the answer prefix are decoded one token at a time.
    """
    ids, text = prompt_text_ids(tokenizer, task)
    cut = text.rindex(task.question)
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    split = 0
    while split < min(len(ids), len(head)) and ids[split] == head[split]:
        split += 1
    return ids, split
