"""How an op stage is called: one definition, two ways in.

Each op stage is one ``torch.library`` custom op (``udn_kernels::*``) whose implementation runs
the kernels of the backend named in its ``backend`` argument; that name is chosen once, at
forward (``_backend.choose``), and kept in the autograd context for the backward. The custom op is
what ``torch.compile`` and ``torch.export`` see. Eager calls run the *same* implementation,
context setup and backward formula through :func:`op_caller`'s ``torch.autograd.Function``, which
skips the dispatcher layers of the custom op: at udn-step's shapes those cost more than the kernels
(``benchmarks/bench_dispatch.py`` measures both ways per call).
"""
from __future__ import annotations

from typing import Callable

import torch


def op_caller(custom_op, impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``call(*inputs)``: ``custom_op(*inputs)`` when compiling, else an autograd.Function running
    ``impl`` / ``setup_context`` / ``backward`` — the functions the custom op is registered with."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    # Named after the op, so its autograd node reads e.g. ``Eager_depth_loglik_dotBackward``.
    eager = type(f"Eager_{custom_op._name}", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    custom_op.register_autograd(backward, setup_context=setup_context)

    def call(*inputs):
        return custom_op(*inputs) if torch.compiler.is_compiling() else eager.apply(*inputs)

    return call


def stage(ctx, custom_op, impl: Callable) -> Callable:
    """What a backward calls for a later stage (e.g. the backward kernels): the custom op inside a
    custom op's backward (traced by torch.compile), ``impl`` itself in an eager backward."""
    return impl if getattr(ctx, "eager", False) else custom_op
