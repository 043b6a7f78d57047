"""Evaluation: every method side by side on the same model and data (`spotlight eval`, `spotlight report`).

- retrieval.py: IoU and attention-mass recall vs the oracle, per layer and KV head, on real decode steps
- ppl.py: perplexity with retrieval active (token-by-token decode mode, or one teacher-forced pass)
- needle.py: passkey and RULER-style needle tasks (tasks.py), the question decoded through the method
- fidelity.py: greedy answers vs the dense model's (exact match, token agreement, ROUGE-L)
- common.py: method specs, the shared dense prefill, results files; report.py: tables and plots
"""
