"""Kernels, each beside its pure-torch reference: pack, score_select, sparse_decode.

The public function of each op dispatches: the Triton kernel on CUDA, the reference elsewhere.
"""
