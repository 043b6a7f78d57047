"""One layer's hash training: its AdamW, learning-rate schedule, pair seeds, statistics and JSONL log.

The streaming trainer (trainer.py) hands each layer's post-RoPE q/k of a batch to its LayerTrainer,
which takes that batch's steps on them. A step: per chunk of the batch, sample pairs (a generator
seeded by (seed, layer, step, chunk), on the training device) and back-propagate loss / chunks in the
batch; under torch.distributed one all-reduce sums the gradients and the loss statistics over the
ranks; clip the layer's gradient norm; AdamW at the scheduled learning rate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from spotlight_attn.config import TrainConfig
from spotlight_attn.hashing.hasher import MLPHasher
from spotlight_attn.train.loss import ranking_loss, sample_pairs

LOG_EVERY = 10  # steps between two lines of a layer's JSONL log (and its last step)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over max(1, warmup * steps) steps, then cosine decay to 0 at `steps`."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def pair_seed(seed: int, layer: int, step: int, chunk: int) -> int:
    return (((seed * 1_000_003 + layer) * 1_000_003 + step) * 1_000_003 + chunk) % 2**63


class LayerTrainer:
    """One layer's hash banks, AdamW, smoothed statistics and JSONL log; steps on q/k the hook hands it."""

    def __init__(self, hasher: MLPHasher, layer: int, config: TrainConfig, device: torch.device):
        self.hasher, self.layer, self.config = hasher, layer, config
        self.params = [p for name in (f"k{layer}", f"q{layer}") if name in hasher.banks for p in hasher.banks[name].parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        self.ema = torch.zeros(2, device=device)  # smoothed (loss, mis-order rate)
        self.log_file = None
        self.start = time.perf_counter()

    def steps(self, queries, keys, chunk_ids, first: int, count: int, total_chunks: int, total_steps: int, scaling: float):
        """`count` steps from step `first` on queries [b, Hq, L, D], keys [b, Hkv, L, D] of chunks `chunk_ids`
        (this rank's share of a batch of `total_chunks`)."""
        config, device = self.config, keys.device
        per_chunk = [(queries[n].float(), keys[n].float()) for n in range(len(chunk_ids))]  # [Hq, L, D], [Hkv, L, D] each
        for step in range(first, first + count):
            lr = config.lr * lr_factor(step, total_steps, config.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=False)
            stats = torch.zeros(2, device=device)  # summed (loss, mis-order) over this rank's chunks
            for (q, k), chunk in zip(per_chunk, chunk_ids):
                generator = torch.Generator(device).manual_seed(pair_seed(config.seed, self.layer, step, chunk))
                with torch.no_grad():
                    pairs = sample_pairs(q, k, config.budget_spec, config.sampling, scaling, generator)
                loss, wrong = ranking_loss(self.hasher, self.layer, q, k, pairs, config.sampling)
                (loss / total_chunks).backward()
                stats += torch.stack([loss.detach(), wrong])
            if dist.is_initialized() and dist.get_world_size() > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in self.params] + [stats])
                dist.all_reduce(flat)
                offset = 0
                for p in self.params:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
                stats = flat[offset:]
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.clip)
            self.optimizer.step()
            stats = stats / total_chunks
            self.ema = stats if step == 0 else 0.95 * self.ema + 0.05 * stats
            if self.log_file is not None and (step % LOG_EVERY == 0 or step == total_steps - 1):
                loss_v, wrong_v = stats.tolist()
                record = {"layer": self.layer, "step": step, "loss": loss_v, "misorder": wrong_v,
                          "grad_norm": float(grad_norm), "lr": lr, "seconds": round(time.perf_counter() - self.start, 3)}
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()

    def open_log(self, path: Path, start_step: int) -> None:
        """Append to the layer's log, dropping lines of steps a resumed run takes again."""
        kept = []
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < start_step]
        self.log_file = path.open("w")
        self.log_file.writelines(line + "\n" for line in kept)

    def stats(self) -> dict:
        loss, misorder = self.ema.tolist()
        return {"loss": loss, "misorder": misorder}
