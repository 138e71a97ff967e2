"""Training a UDN under ``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, nccl on GPU).

DDP fixes its parameter list when it is constructed, but a UDN grows new blocks and heads while it
trains. :class:`DistributedUDN` keeps the two in step:

* before every forward it agrees on the truncation ``L`` across ranks (all-reduce MAX of each
  rank's ``q.max_depth``; ranks normally agree anyway because DDP averages the gradient of the
  depth rate) so all ranks build exactly the same blocks;
* when that grew the model, it re-wraps it in a new DDP, whose constructor broadcasts rank 0's
  parameters (so the fresh blocks are identical everywhere) and registers the new parameters
  for gradient all-reduce. New parameters also join the optimizer passed to
  ``model.attach_optimizer`` (same on every rank);
* DDP runs with ``find_unused_parameters=True``: blocks beyond the current ``L`` (kept when ``L``
  shrinks) get no gradient.

Usage (one process per rank, process group already initialised)::

    model = UDN.mlp(...)
    opt = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    ddp = DistributedUDN(model)
    for x, y in loader:                 # each rank its shard; n_data = the full dataset size
        opt.zero_grad()
        ddp.loss(x, y, n_data).backward()
        opt.step()

With equal shard sizes the averaged gradient equals single-process training on the combined batch.
"""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .udn import UDN


class DistributedUDN:
    """Holds a :class:`UDN` and the DDP wrapper around it, re-wrapping after growth (see module doc)."""

    def __init__(self, model: UDN, **ddp_kwargs):
        if not dist.is_initialized():
            raise RuntimeError("DistributedUDN: torch.distributed is not initialised "
                               "(call dist.init_process_group first)")
        self.module = model
        self.ddp_kwargs = {"find_unused_parameters": True, **ddp_kwargs}
        self.ddp: DistributedDataParallel | None = None
        self._wrapped_depth = -1
        self.sync()

    def sync(self) -> DistributedDataParallel:
        """Grow every rank to the largest ``L`` of any rank; re-wrap in DDP if blocks were added."""
        reference = self.module.depth.raw_rate
        device = reference.device if dist.get_backend() == "nccl" else torch.device("cpu")
        depth = torch.tensor([self.module.depth.max_depth], dtype=torch.int64, device=device)
        dist.all_reduce(depth, op=dist.ReduceOp.MAX)
        self.module.grow(int(depth))
        # Compare with the depth DDP was built for: the optimizer hook of ``attach_optimizer`` may
        # have grown the model after the last step, outside this method.
        if self.ddp is None or self.module.built_depth != self._wrapped_depth:
            if self.ddp is not None:
                # Drop the old reducer (and its gradient hooks) before the new one registers its own.
                self.ddp = None
                gc.collect()
            self.ddp = DistributedDataParallel(self.module, **self.ddp_kwargs)
            self._wrapped_depth = self.module.built_depth
        return self.ddp

    def loss(self, x: torch.Tensor, y: torch.Tensor, n_data: int) -> torch.Tensor:
        """``-ELBO / n_data`` on this rank's shard, through DDP (gradients are averaged over ranks)."""
        return self.sync()(x, y, n_data)

    def predict(self, x: torch.Tensor, samples: int | None = None):
        """Prediction on the local module (no communication)."""
        return self.module.predict(x, samples=samples)
