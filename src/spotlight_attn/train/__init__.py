"""Hash training: record q/k (record.py), Bradley-Terry ranking loss (loss.py), per-layer trainer (trainer.py)."""

from spotlight_attn.train.loss import PairSampling, ranking_loss, sample_pairs
from spotlight_attn.train.record import load_layer, record_qk
from spotlight_attn.train.trainer import TrainConfig, train_hasher, train_layers

__all__ = ["PairSampling", "TrainConfig", "load_layer", "ranking_loss", "record_qk", "sample_pairs", "train_hasher", "train_layers"]
