"""Hash training: Bradley-Terry ranking loss (loss.py), one layer's steps (layer.py), the streaming
trainer (trainer.py), its checkpoints (state.py), and q/k recording (record.py)."""

from spotlight_attn.train.loss import PairSampling, ranking_loss, sample_pairs
from spotlight_attn.train.record import load_layer, record_qk
from spotlight_attn.train.trainer import Progress, TrainConfig, stream_train, train_hasher

__all__ = ["PairSampling", "Progress", "TrainConfig", "load_layer", "ranking_loss", "record_qk", "sample_pairs", "stream_train", "train_hasher"]
