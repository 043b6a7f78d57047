"""What every evaluation shares: method specs, one prefill for many methods, results files.

A method spec names a selector and its settings in one word, as the CLI takes them:
    dense | oracle | streaming | spotlight | spotlight=FILE | linear128 | linear:1024 | quest | quest:32
`spotlight` uses the hasher given to the run (or the one shipped for the model). Each spec runs at
every budget of the run, except dense, which reads everything and runs once.

A results file is JSON: {"kind", "meta": {model, data, methods, budgets, seed, version, machine,
command, settings, seconds}, "rows": [...]}, written atomically, with a markdown table beside it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from spotlight_attn import compat
from spotlight_attn.config import Method, SpotlightConfig
from spotlight_attn.errors import SpotlightError
from spotlight_attn.hashing.checkpoint import atomic_write

SPEC_PATTERN = re.compile(r"^(?P<name>[a-z]+?)(?::?(?P<number>\d+))?(?:=(?P<path>.+))?$")
DEFAULT_PAGE = 16


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One method of a run: which selector, with its bits / page size / hasher file."""

    method: Method
    bits: int | None = None  # linear: SimHash width
    page_size: int | None = None  # quest
    hasher: str | None = None  # spotlight: learned hasher file
    head_budgets: str | None = None  # a head budget profile (budgets.py): the label gets "+heads"

    @property
    def label(self) -> str:
        if self.method is Method.LINEAR:
            name = f"linear{self.bits}"
        elif self.method is Method.QUEST:
            name = f"quest{self.page_size}"
        else:
            name = self.method.value
        return name + ("+heads" if self.head_budgets else "")

    @property
    def budgeted(self) -> bool:
        """False for dense, which reads every key at any budget."""
        return self.method is not Method.DENSE

    def config(self, base: SpotlightConfig, budget: float | int) -> SpotlightConfig:
        changes = {"method": self.method, "budget": budget if self.budgeted else 1.0}
        if self.bits is not None:
            changes["bits"] = self.bits
        if self.page_size is not None:
            changes["page_size"] = self.page_size
        if self.head_budgets is not None:
            changes["head_budgets"] = self.head_budgets
        return replace(base, **changes)


def parse_methods(text: str, hasher: str | None = None) -> list[MethodSpec]:
    """'dense,oracle,linear128,quest:32,spotlight=h.safetensors' -> MethodSpecs, in order, no repeats."""
    specs: list[MethodSpec] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        match = SPEC_PATTERN.match(word)
        try:
            method = Method(match["name"]) if match else None
        except ValueError:
            method = None
        if method is None:
            raise SpotlightError(
                f"method {word!r} is not one of: dense, oracle, streaming, spotlight[=FILE], linear<bits>, quest[:<page size>]"
            )
        number, path = match["number"], match["path"]
        if path is not None and method is not Method.SPOTLIGHT:
            raise SpotlightError(f"method {word!r}: only spotlight takes a hasher file")
        if number is not None and method not in (Method.LINEAR, Method.QUEST):
            raise SpotlightError(f"method {word!r}: only linear (bits) and quest (page size) take a number")
        if method is Method.LINEAR:
            spec = MethodSpec(method, bits=int(number) if number else 128)
        elif method is Method.QUEST:
            spec = MethodSpec(method, page_size=int(number) if number else DEFAULT_PAGE)
        elif method is Method.SPOTLIGHT:
            spec = MethodSpec(method, hasher=path or hasher)
        else:
            spec = MethodSpec(method)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise SpotlightError("no methods given")
    return specs


def with_head_budgets(specs: list[MethodSpec], text: str | None) -> list[MethodSpec]:
    """'spotlight=a.safetensors,linear1024=b.safetensors': after each named method, the same method
    with that head budget profile (label "<method>+heads"), so a run compares the two."""
    if not text:
        return specs
    profiles = {}
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        label, sep, path = word.partition("=")
        if not sep or not path:
            raise SpotlightError(f"--head-budgets takes METHOD=FILE pairs (e.g. spotlight=heads.safetensors), got {word!r}")
        if not Path(path).is_file():
            raise SpotlightError(f"head budget profile not found: {path}")
        profiles[label] = path
    labels = {spec.label for spec in specs}
    unknown = sorted(set(profiles) - labels)
    if unknown:
        raise SpotlightError(f"--head-budgets names methods {unknown} that --methods does not run ({sorted(labels)})")
    out = []
    for spec in specs:
        out.append(spec)
        if spec.label in profiles:
            if not spec.budgeted or spec.method in (Method.QUEST, Method.STREAMING):
                raise SpotlightError(f"head budgets serve spotlight, linear and oracle, not {spec.label}")
            out.append(replace(spec, head_budgets=profiles[spec.label]))
    return out


def parse_budgets(text: str) -> list[float | int]:
    from spotlight_attn.config import Budget, parse_budget

    budgets = [parse_budget(word) for word in text.split(",") if word.strip()]
    for amount in budgets:
        Budget(amount)  # range check, with its message
    if not budgets:
        raise SpotlightError("no budgets given")
    return budgets


def runs(specs: list[MethodSpec], budgets: list[float | int]) -> list[tuple[MethodSpec, float | int | None]]:
    """Every (method, budget) pair of a run; dense once, with budget None."""
    return [(spec, None) for spec in specs if not spec.budgeted] + [
        (spec, b) for b in budgets for spec in specs if spec.budgeted
    ]


class Methods:
    """Loads each learned hasher once and switches the model between methods."""

    def __init__(self, model, model_spec: str, base: SpotlightConfig | None = None):
        self.model = model
        self.model_spec = model_spec
        self.base = base or SpotlightConfig()
        self._hashers: dict[str, object] = {}

    def hasher_path(self, spec: MethodSpec) -> str:
        from spotlight_attn.hashing.shipped import describe_shipped, shipped_hasher

        path = spec.hasher or shipped_hasher(self.model)
        if path is None:
            raise SpotlightError(
                f"method spotlight needs --hasher FILE: no hasher ships for the model {self.model_spec!r} (shipped: {describe_shipped()})"
            )
        if not Path(path).is_file():
            raise SpotlightError(f"hasher file not found: {path}")
        return str(path)

    def enable(self, spec: MethodSpec, budget: float | int | None):
        """Enable `spec` at `budget` on the model; returns the model's Installed setting."""
        from spotlight_attn.attention import enable
        from spotlight_attn.hashing import load_hasher

        hasher = None
        if spec.method is Method.SPOTLIGHT:
            path = self.hasher_path(spec)
            if path not in self._hashers:
                self._hashers[path] = load_hasher(path, self.model, device=self.model.device)
            hasher = self._hashers[path]
        enable(self.model, hasher, spec.config(self.base, budget if budget is not None else 1.0))
        return self.model.spotlight

    def hasher_bits(self) -> dict[str, int]:
        """{file: code width} of every learned hasher used so far, for the results' meta."""
        return {path: int(hasher.bits) for path, hasher in self._hashers.items()}

    def hasher_digests(self) -> dict[str, str]:
        """{file: sha256} of every learned hasher used so far, for the results' meta."""
        import hashlib

        return {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in self._hashers}


def dense_prefill(model, input_ids: torch.Tensor):
    """The model's own forward over a prompt [B, T]: (last logits [B, V], a cache any method can index)."""
    from spotlight_attn.attention import disable

    disable(model)
    with torch.inference_mode():
        out = model(input_ids.to(model.device), use_cache=True)
    return out.logits[:, -1].float(), compat.output_cache(out)


def decode_tokens(model, cache, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Feed `tokens` [B, n] one at a time through the enabled method: (logits [B, n, V], cache)."""
    steps, name = [], compat.cache_argument(model)
    with torch.inference_mode():
        for i in range(tokens.shape[1]):
            out = model(tokens[:, i : i + 1].to(model.device), use_cache=True, **{name: cache})
            cache = compat.output_cache(out)
            steps.append(out.logits[:, -1].float())
    return (torch.stack(steps, 1) if steps else torch.empty(tokens.shape[0], 0, 0)), cache


def greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding from the last logits [1, V] through the enabled method: the new token ids."""
    new: list[int] = []
    name = compat.cache_argument(model)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(logits[0].argmax())
            if token in stop_ids:
                break
            new.append(token)
            out = model(torch.tensor([[token]], device=model.device), use_cache=True, **{name: cache})
            cache, logits = compat.output_cache(out), out.logits[:, -1].float()
    return new


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def new_results(kind: str, model: str, data: str | None, specs: list[MethodSpec], budgets: list, seed: int, settings: dict) -> dict:
    from spotlight_attn import __version__

    return {
        "kind": kind,
        "meta": {
            "model": model,
            "data": data,
            "methods": [s.label for s in specs],
            "hashers": {},  # file -> sha256, filled in as Methods loads them
            "budgets": budgets,
            "seed": seed,
            "version": __version__,
            "machine": machine(),
            "command": " ".join(["spotlight", *sys.argv[1:]]) if Path(sys.argv[0]).name == "spotlight" else None,
            "settings": settings,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "rows": [],
    }


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write results JSON (atomically) and its markdown table beside it (same name, .md)."""
    from spotlight_attn.eval.report import markdown

    path = Path(path)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown(results) + "\n")
    return path


def read_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpotlightError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpotlightError(f"{path} is not a results file (not JSON: {error})") from None
    if not isinstance(results, dict) or not {"kind", "meta", "rows"} <= results.keys():
        raise SpotlightError(f"{path} is not a spotlight results file (needs kind, meta and rows)")
    return results


MERGED_META = ("methods", "budgets", "hashers", "hasher_bits", "command", "started", "seconds")  # may differ between parts


def merge_results(parts: list[dict], names: list[str] | None = None) -> dict:
    """Results of one evaluation run as several processes, each over its own methods (the same tasks,
    chunks and settings), -> one results dict with every row and intervals recomputed, so figures
    paired with dense come out as if one process had run them all. Refuses parts that differ in
    anything but their methods, or where two parts asked for the same (method, budget). Rows of a
    method a part did not ask for are a reference its evaluation computes itself (fidelity's dense
    replies): kept once, and refused where another part's differ."""
    from spotlight_attn.eval.stats import summarize

    names = names or [f"part {i + 1}" for i in range(len(parts))]
    if not parts:
        raise SpotlightError("nothing to merge: give at least one results file")
    first = parts[0]
    for name, part in zip(names[1:], parts[1:]):
        if part["kind"] != first["kind"]:
            raise SpotlightError(f"cannot merge {name} ({part['kind']} results) with {names[0]} ({first['kind']} results)")
        for field in sorted((first["meta"].keys() | part["meta"].keys()) - set(MERGED_META) - {"machine", "intervals"}):
            if part["meta"].get(field) != first["meta"].get(field):
                raise SpotlightError(f"cannot merge {name} with {names[0]}: their {field} differ "
                                     f"({part['meta'].get(field)!r} against {first['meta'].get(field)!r})")
    seen: dict[tuple, tuple[str, list[dict], bool]] = {}  # (method, budget) -> the part that has it, its rows, asked for
    rows: list[dict] = []
    hashers: dict[str, str] = {}
    for name, part in zip(names, parts):
        mine: dict[tuple, list[dict]] = {}
        for row in part["rows"]:
            mine.setdefault((row["method"], row["budget"]), []).append(row)
        for pair, pair_rows in mine.items():
            asked = pair[0] in part["meta"]["methods"]
            if pair not in seen:
                seen[pair] = (name, pair_rows, asked)
                rows.extend(pair_rows)
            elif (asked and seen[pair][2]) or pair_rows != seen[pair][1]:
                raise SpotlightError(f"{name} repeats method {pair[0]} at budget {pair[1]}, already in {seen[pair][0]}")
        for path, digest in (part["meta"].get("hashers") or {}).items():
            if hashers.setdefault(path, digest) != digest:
                raise SpotlightError(f"{name} used another hasher at {path} (sha256 {digest[:12]}... against {hashers[path][:12]}...)")
    meta = {key: value for key, value in first["meta"].items() if key not in MERGED_META}
    meta["methods"] = list(dict.fromkeys(m for part in parts for m in part["meta"]["methods"]))
    meta["budgets"] = list(dict.fromkeys(b for part in parts for b in part["meta"]["budgets"]))
    meta["hashers"] = hashers
    meta["hasher_bits"] = {k: v for part in parts for k, v in (part["meta"].get("hasher_bits") or {}).items()}
    meta["started"] = min(part["meta"]["started"] for part in parts)
    meta["seconds"] = max(part["meta"].get("seconds") or 0.0 for part in parts)  # the parts ran side by side
    meta["merged_from"] = [
        {"part": name, "methods": part["meta"]["methods"], "command": part["meta"].get("command"),
         "seconds": part["meta"].get("seconds"), "machine": part["meta"].get("machine")}
        for name, part in zip(names, parts)
    ]
    merged = {"kind": first["kind"], "meta": meta, "rows": rows}
    return summarize(merged, seed=(first["meta"].get("intervals") or {}).get("seed", 0))
