"""Early-exit loss of a bfloat16 Hugging Face Llama through depth_mixture_nll (docs/precision.md).

A tiny LlamaForCausalLM (random init from a config, nothing downloaded) in bfloat16: the hidden state
after every decoder layer goes through the model's final norm, the states are stacked into
``hidden [L, N, D]`` and scored against the shared ``lm_head`` weight; loss and gradients (of the
hidden states, the head weight and the layers' parameters) agree with the eager bfloat16 loss that
materialises every layer's logits, within the accuracy contract of tests/test_precision_heads.py.
"""
import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import depth_mixture_nll

transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is not installed")

TOL = 2.0**-7  # bfloat16 machine epsilon, as in tests/test_precision_heads.py


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def _early_exit_inputs(model, tokens):
    """``hidden [L, N, D]`` (every layer's output through the final norm, positions 0..T-2) and the
    next-token targets ``[N]``."""
    out = model.model(input_ids=tokens, output_hidden_states=True)
    # hidden_states: embeddings, then each decoder layer's output; the last one is the model's
    # last_hidden_state, already through the final norm
    states = out.hidden_states[1:]
    normed = [model.model.norm(h) for h in states[:-1]] + [states[-1]]
    hidden = torch.stack([h[:, :-1].reshape(-1, h.shape[-1]) for h in normed])
    return hidden, tokens[:, 1:].reshape(-1)


def _losses(model, tokens, log_weights, fn):
    model.zero_grad(set_to_none=True)
    hidden, target = _early_exit_inputs(model, tokens)
    hidden.retain_grad()
    loss = fn(hidden, model.lm_head.weight, target, log_weights)
    loss.backward()
    layer_grad = model.model.layers[0].mlp.down_proj.weight.grad
    return loss.detach(), hidden.grad.detach(), model.lm_head.weight.grad.detach(), layer_grad.detach()


def _eager(hidden, weight, target, log_weights):
    """Materialise each layer's logits in the inputs' dtype, cross-entropy, weighted over layers."""
    ll = torch.stack([-F.cross_entropy(F.linear(h, weight), target, reduction="none") for h in hidden])
    return -(torch.exp(log_weights) @ ll.to(log_weights.dtype)).mean()


def _ours(hidden, weight, target, log_weights):
    return depth_mixture_nll(hidden, weight, None, target, log_weights)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_llama_bfloat16_early_exit_loss_within_eager_error(backend):
    model = _model()
    tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    log_weights = torch.log_softmax(torch.tensor([0.2, 0.5, 1.0]), 0)
    with udn_kernels.backend(backend, strict=True):
        ours = _losses(model, tokens, log_weights, _ours)
    eager = _losses(model, tokens, log_weights, _eager)
    ref = _losses(model.double(), tokens, log_weights.double(), _eager)
    assert ours[0].dtype == torch.float32
    assert [g.dtype for g in ours[1:]] == [torch.bfloat16] * 3
    for name, o, e, r in zip(("loss", "d_hidden", "d_lm_head", "d_layer0_down_proj"), ours, eager, ref):
        err = ((o.double() - r).abs().max() / r.abs().max()).item()
        err_eager = ((e.double() - r).abs().max() / r.abs().max()).item()
        assert err <= err_eager + TOL, f"{name}: error {err:.3g} > eager {err_eager:.3g} + {TOL:.3g}"
