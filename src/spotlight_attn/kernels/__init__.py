"""Kernels, each beside its pure-torch reference: pack, score_select, sparse_decode; dense (flash varlen
over the static cache); ops (the decode step's kernels registered as torch custom ops, for torch.compile).

The public function of each op dispatches: the Triton kernel on CUDA tensors, the reference
elsewhere. `force_reference=True` or SPOTLIGHT_FORCE_REFERENCE=1 forces the reference (debugging);
`use_kernel=True` runs the kernel on CPU tensors under TRITON_INTERPRET=1 (tests). Importing this
package never imports Triton (see _triton.py).
"""
