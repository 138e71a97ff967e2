"""Early-exit loss for Hugging Face causal LMs (Llama, Qwen2, Mistral, GPT-2 and their kin).

The base model (``model.model`` / ``model.transformer``) runs once with ``output_hidden_states``;
each chosen layer's hidden state goes through the model's own final norm, and all of them through
the shared LM head (weight, and bias if any) in ONE ``depth_mixture_nll`` call in expected mode
with ``log_weights = log(scales)``: ``sum_e scale_e * mean-token NLL of exit e``, the loss
torchtune's ``early_exit_loss`` computes by materialising ``[exits, tokens, vocab]`` logits, which
are never built here. The LM head module itself is never called.

Layers are 0-based indices into the decoder stack; layer ``i``'s output is
``hidden_states[i + 1]``. The last layer's exit reads ``last_hidden_state``, which the model has
already normed (the norm is not applied twice). Duck-typed: transformers is not imported.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import depth_mixture_nll

# Normalised before use: a scale's weight of layer i (0-based) from d = i + 1, as torchtune's
# *_loss_scale functions; "sum" (alias "cumulative") is the running sum of d over the active exits.
_SCALE_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "uniform": torch.ones_like,
    "linear": lambda d: d,
    "sum": lambda d: torch.cumsum(d, 0),
    "cumulative": lambda d: torch.cumsum(d, 0),
    "sqrt": torch.sqrt,
    "inverse": torch.reciprocal,
    "inverse_sqrt": torch.rsqrt,
}
SCALES = tuple(_SCALE_FNS)

# depth_mixture_nll's LM-loss options and their neutral values: a neutral option is not passed on,
# so the loss runs on builds of the op that predate them.
_LM_OPTIONS = {"label_smoothing": 0.0, "lse_square_scale": 0.0, "softcap": None}
_OP_PARAMETERS = frozenset(inspect.signature(depth_mixture_nll).parameters)

# Attribute of the base model holding the final norm, by architecture family.
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm")

try:  # FSDP2 and DTensor: absent from torch builds without distributed support
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    FSDPModule = DTensor = ()


def resolve_exits(exits, num_layers: int, include_last: bool = True) -> list[int]:
    """Sorted 0-based layer indices of the exits.

    ``exits``: None (every layer), an int ``k`` (every k-th layer: ``k-1, 2k-1, ...``) or a
    sequence of indices (negative ones count from the end). ``include_last`` adds the last layer.
    """
    if exits is None:
        chosen = set(range(num_layers))
    elif isinstance(exits, int) and not isinstance(exits, bool):
        if exits < 1:
            raise ValueError(f"exits: expected every-k-th with k >= 1, got {exits}")
        chosen = set(range(exits - 1, num_layers, exits))
    else:
        chosen = set()
        for index in exits:
            if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
                raise ValueError(f"exits: expected layer indices in [-{num_layers}, {num_layers}), got {index!r}")
            chosen.add(index % num_layers)
    if include_last:
        chosen.add(num_layers - 1)
    return sorted(chosen)


def layer_scales(layers: Sequence[int], num_layers: int, scale: str = "uniform", e_scale: float = 1.0) -> Tensor:
    """Normalised float64 weights of the exits ``layers`` (sorted 0-based indices): ``scale``'s
    value of ``d = layer + 1``, times ``e_scale`` on every exit but the model's last layer."""
    if scale not in _SCALE_FNS:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    if not (float(e_scale) >= 0.0 and float(e_scale) != float("inf")):
        raise ValueError(f"e_scale: expected a finite float >= 0, got {e_scale}")
    ids = torch.tensor(list(layers), dtype=torch.float64)
    weights = _SCALE_FNS[scale](ids + 1)
    weights = torch.where(ids < num_layers - 1, weights * e_scale, weights)
    total = weights.sum()
    if not total > 0:
        raise ValueError(f"e_scale: {e_scale} leaves every active exit ({list(layers)}) with weight 0")
    return weights / total


class RotationalCurriculum:
    """torchtune's rotational curriculum: the set of exits rolls forward one layer per step, so
    at step ``t`` layer ``(i + t) mod num_layers`` is active for every chosen exit ``i``."""

    def active(self, exits: Sequence[int], num_layers: int, step: int) -> list[int]:
        return sorted({(i + step) % num_layers for i in exits})


class GradualCurriculum:
    """torchtune's gradual curriculum: exits switch on from the last layer down; chosen exit ``i``
    is active once ``step >= fraction * max_steps * (num_layers - i) / num_layers``, so every exit
    is on from ``fraction * max_steps`` steps. (torchtune applies the same rule one step late.)"""

    def __init__(self, max_steps: int, fraction: float = 0.5):
        if max_steps < 1 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"GradualCurriculum: expected max_steps >= 1 and fraction in [0, 1], "
                             f"got {max_steps}, {fraction}")
        self.max_steps, self.fraction = max_steps, fraction

    def active(self, exits: Sequence[int], num_layers: int, step: int) -> list[int]:
        return [i for i in exits if step * num_layers >= self.fraction * self.max_steps * (num_layers - i)]


CURRICULA = {"rotational": RotationalCurriculum, "gradual": GradualCurriculum}


@dataclasses.dataclass
class ExitStats:
    """Per-exit statistics of one loss call (no gradient): the active ``layers``, their normalised
    ``weights``, each exit's mean token ``nll`` and argmax ``accuracy`` over the non-ignored
    tokens, and their ``count``."""

    layers: tuple[int, ...]
    weights: Tensor
    nll: Tensor
    accuracy: Tensor
    count: Tensor


@dataclasses.dataclass(frozen=True)
class _Parts:
    base: nn.Module
    norm: nn.Module
    head: nn.Module
    num_layers: int


def _parts(model: nn.Module) -> _Parts:
    """The base model, final norm, LM head and layer count of a Hugging Face causal LM."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = next((getattr(base, name) for name in _NORM_NAMES if isinstance(getattr(base, name, None), nn.Module)),
                None)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if base is None or base is model or head is None or norm is None or not isinstance(num_layers, int):
        raise TypeError(f"model: expected a Hugging Face *ForCausalLM / *LMHeadModel with a base model, an "
                        f"output embedding and a final norm ({' / '.join(_NORM_NAMES)}), got "
                        f"{type(model).__name__}")
    return _Parts(base, norm, head, num_layers)


def _shifted_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """``[B*T]`` targets of every position: the next token's label (HF's shift), the last
    position ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)


def _call_through(module: nn.Module, call: nn.Module, fn: Callable, *args):
    """``fn(*args)`` run as ``module``'s forward, invoked as ``call(*args)``: the hooks and wrappers
    around the module (FSDP2's parameter gathering and gradient reduce-scatter, DDP) run around it."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        return call(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _head_loss(head: nn.Module, hidden: Tensor, target: Tensor, log_weights: Tensor, reduction: str,
               ignore_index: int, options: dict):
    """The fused loss on ``head``'s weight and bias, read inside the head's own call when FSDP
    shards the head by itself (its hooks gather the weight only there)."""

    def fused(hidden):
        weight, bias = head.weight, getattr(head, "bias", None)
        if isinstance(weight, DTensor):
            raise RuntimeError(
                f"early_exit_loss: the LM head weight is still a sharded DTensor ({weight.placements}) when the "
                "fused loss reads it. Shard the model with FSDP2's fully_shard (the root, or the LM head "
                "itself), whose forward hooks gather it; a tensor-parallel head is not supported.")
        return depth_mixture_nll(hidden.to(weight.dtype), weight, bias, target, log_weights.to(weight.dtype),
                                 mode="expected", reduction=reduction, ignore_index=ignore_index, **options)

    return _call_through(head, head, fused, hidden) if isinstance(head, FSDPModule) else fused(hidden)


def _op_options(options: dict, return_stats: bool) -> dict:
    """The options to pass to depth_mixture_nll (the non-neutral ones); TypeError naming the ones
    this build of the op lacks."""
    unknown = sorted(set(options) - set(_LM_OPTIONS))
    if unknown:
        raise TypeError(f"early_exit_loss: unexpected options {unknown}, expected some of {sorted(_LM_OPTIONS)}")
    passed = {k: v for k, v in options.items() if v != _LM_OPTIONS[k]}
    if return_stats:
        passed["return_stats"] = True
    missing = sorted(set(passed) - _OP_PARAMETERS)
    if missing:
        raise TypeError(f"early_exit_loss: this build's udn_kernels.depth_mixture_nll does not accept {missing} "
                        "(the LM loss options: label_smoothing, lse_square_scale, softcap, return_stats)")
    return passed


def early_exit_loss(model: nn.Module, input_ids: Tensor, labels: Optional[Tensor] = None, *,
                    attention_mask: Optional[Tensor] = None, exits=None, include_last: bool = True,
                    scale: str = "uniform", e_scale: float = 1.0, curriculum=None, step: int = 0,
                    return_stats: bool = False, num_items_in_batch=None, ignore_index: int = -100,
                    call: Optional[nn.Module] = None, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                    softcap: Optional[float] = None, **model_kwargs):
    """Early-exit loss of a Hugging Face causal LM on ``input_ids`` ``[B, T]``.

    ``labels``: HF-style, unshifted (``labels[t + 1]`` is position ``t``'s target), ``ignore_index``
    ignored; default ``input_ids`` with the padding (``attention_mask == 0``) ignored.
    ``exits``/``include_last``: :func:`resolve_exits`; ``curriculum`` (a :class:`RotationalCurriculum`
    or :class:`GradualCurriculum`) picks the active exits at training ``step``, the last layer kept
    with ``include_last``. ``scale``/``e_scale``: :func:`layer_scales` of the active exits. The loss
    is ``sum_e w_e mean_tokens NLL_e`` (``num_items_in_batch`` given: token sums divided by it, as
    HF models do under gradient accumulation). ``label_smoothing``, ``lse_square_scale`` (z-loss)
    and ``softcap`` go to ``depth_mixture_nll``. ``call``: the module to invoke when ``model`` is
    wrapped (DDP); an FSDP2 ``model`` is invoked itself. ``return_stats``: also an :class:`ExitStats`.
    Other keyword arguments go to the base model (e.g. ``position_ids``).
    """
    parts = _parts(model)
    options = _op_options(dict(label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                               softcap=softcap), return_stats)
    layers = resolve_exits(exits, parts.num_layers, include_last=False)
    if curriculum is not None:
        layers = curriculum.active(layers, parts.num_layers, step)
    if include_last and parts.num_layers - 1 not in layers:
        layers = sorted(layers) + [parts.num_layers - 1]
    if not layers:
        raise ValueError(f"early_exit_loss: no exit is active at step {step} (include_last=False)")
    weights = layer_scales(layers, parts.num_layers, scale, e_scale)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    target = _shifted_targets(labels, ignore_index)
    reduction = "mean" if num_items_in_batch is None else "sum"

    def forward(input_ids, attention_mask):
        out = parts.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         use_cache=False, **model_kwargs)
        last = parts.num_layers - 1
        states = [parts.norm(out.hidden_states[i + 1]) if i < last else out.last_hidden_state for i in layers]
        hidden = torch.stack(states).flatten(1, 2)  # [E, B*T, D]
        return _head_loss(parts.head, hidden, target, weights.log().to(hidden.device), reduction, ignore_index,
                          options)

    if call is not None or isinstance(model, FSDPModule):
        result = _call_through(model, call if call is not None else model, forward, input_ids, attention_mask)
    else:
        result = forward(input_ids, attention_mask)
    loss, stats = result if return_stats else (result, None)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    if not return_stats:
        return loss
    return loss, ExitStats(tuple(layers), weights, stats.nll, stats.accuracy, stats.count)


class EarlyExitLoss(nn.Module):
    """Module form of :func:`early_exit_loss` bound to ``model`` and its settings, with a step
    counter for the curriculum: ``step()`` advances it (once per optimizer step); ``forward``'s
    ``step`` argument overrides it.

    ``compute_loss`` has ``transformers.Trainer.compute_loss``'s signature: assign it
    (``trainer.compute_loss = loss.compute_loss``) or call it from a subclass (docs/early_exit_lm.md).
    """

    def __init__(self, model: nn.Module, *, exits=None, include_last: bool = True, scale: str = "uniform",
                 e_scale: float = 1.0, curriculum=None, ignore_index: int = -100, **options):
        super().__init__()
        _parts(model)  # fail early on a model without the expected parts
        self.model = model
        self.settings = dict(exits=exits, include_last=include_last, scale=scale, e_scale=e_scale,
                             curriculum=curriculum, ignore_index=ignore_index, **options)
        _op_options(options, False)  # unknown or unsupported options fail here, not at the first step
        self.training_step = 0

    def step(self) -> None:
        self.training_step += 1

    def get_extra_state(self):
        return {"training_step": self.training_step}

    def set_extra_state(self, state) -> None:
        self.training_step = state["training_step"]

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                *, step: Optional[int] = None, return_stats: bool = False, **kwargs):
        return early_exit_loss(self.model, input_ids, labels, attention_mask=attention_mask,
                               step=self.training_step if step is None else step, return_stats=return_stats,
                               **self.settings, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch=None, *, step: Optional[int] = None):
        """``Trainer.compute_loss``: ``model`` is the model as the Trainer holds it (possibly a DDP
        wrapper of ``self.model``, which is then invoked around the loss)."""
        inputs = dict(inputs)
        input_ids, labels = inputs.pop("input_ids"), inputs.pop("labels", None)
        attention_mask = inputs.pop("attention_mask", None)
        loss = self(input_ids, labels, attention_mask, step=step, num_items_in_batch=num_items_in_batch,
                    call=None if model is self.model else model, **inputs)
        return (loss, {"loss": loss}) if return_outputs else loss
