"""The Triton backend's depth-head kernels, gathered: ``KERNELS`` and ``AOT_SPECS`` of

- ``heads_forward``: ``depth_loglik_fwd`` (``_fwd_kernel``);
- ``heads_backward``: ``depth_loglik_bwd`` (``_bwd_rows_kernel``, ``_bwd_weight_kernel``);
- ``heads_fused``: ``depth_loglik_fwd_bwd`` / ``depth_loglik_mixture_fwd_bwd`` (gradient in the
  forward, ``_fused_rows_kernel`` between GEMMs);
- ``heads_predict``: ``depth_mixture_predict`` (``_lse_kernel``, ``_predict_kernel``);

with the configs and tile helpers they share in ``heads_common``. The ``[L, N, C]`` logits never
exist in memory outside the fused path's bounded chunks: the other kernels recompute
``[BLOCK_N, BLOCK_C]`` logits tiles with ``tl.dot`` and reduce them in registers. No atomics:
every output element has one owner program, so results are bitwise reproducible (docs/triton.md
explains the choice). Index arithmetic that can pass 2^31 is done in int64.
"""
from . import heads_backward, heads_forward, heads_fused, heads_predict

_MODULES = (heads_forward, heads_backward, heads_predict, heads_fused)

KERNELS = {name: kernel for module in _MODULES for name, kernel in module.KERNELS.items()}
AOT_SPECS = [spec for module in _MODULES for spec in module.AOT_SPECS]
