"""Selectors (one per method) and the top-k rules they share."""

from spotlight_attn.selection.selectors import (
    DenseSelector,
    HashSelector,
    OracleSelector,
    QuestSelector,
    Selector,
    StreamingSelector,
)
from spotlight_attn.selection.topk import forced_mask, rows_budget, select_mask, select_topk

__all__ = [
    "DenseSelector",
    "HashSelector",
    "OracleSelector",
    "QuestSelector",
    "Selector",
    "StreamingSelector",
    "forced_mask",
    "rows_budget",
    "select_mask",
    "select_topk",
]
