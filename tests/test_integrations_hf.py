"""udn_kernels.integrations.hf: the fused early-exit loss of Hugging Face causal LMs equals an eager
torchtune-style loss that materialises every exit's logits (fp32: loss to rtol 1e-5, every
parameter's gradient to rtol 1e-4 / atol 1e-6), with padding and ignored tokens, for every scale,
both curricula and four architectures built from tiny random configs (nothing downloaded)."""
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="transformers (udn_kernels[dev]) not installed")

from udn_kernels.integrations import (EarlyExitLoss, GradualCurriculum, RotationalCurriculum,  # noqa: E402
                                      early_exit_loss, layer_scales, resolve_exits)
from udn_kernels.integrations import hf  # noqa: E402

VOCAB, HIDDEN, LAYERS = 100, 32, 4
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _llama_like(config_cls, model_cls):
    config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return model_cls(config)


ARCHS = {
    "llama": lambda: _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": lambda: _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": lambda: _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
    # GPT-2 ties its LM head to the token embedding (one parameter gets both gradients)
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}

# torchtune's scales of layer number d = index + 1, written out independently of the module
SCALE_VALUES = {"uniform": lambda d, prev: 1.0, "linear": lambda d, prev: d, "sum": lambda d, prev: prev + d,
                "cumulative": lambda d, prev: prev + d, "sqrt": lambda d, prev: math.sqrt(d),
                "inverse": lambda d, prev: 1.0 / d, "inverse_sqrt": lambda d, prev: 1.0 / math.sqrt(d)}


def expected_scales(layers, scale, e_scale=1.0):
    values, running = [], 0.0
    for i in layers:
        running += i + 1
        d_value = SCALE_VALUES[scale](i + 1, running - (i + 1))
        values.append(d_value * (e_scale if i < LAYERS - 1 else 1.0))
    return [v / sum(values) for v in values]


def build(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch]().float()


def batch(seed=1):
    """Two rows of 12 tokens, the second right-padded by 4; labels ignore the padding and two
    tokens of the first row."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 3] = labels[0, 7] = -100
    return input_ids, attention_mask, labels


def exit_logits(model, input_ids, attention_mask):
    """Every layer's logits, materialised: the model's own logits for the last layer, the final
    norm and the LM head on the earlier layers' hidden states."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    norm = getattr(model.base_model, "norm", None) or model.base_model.ln_f
    return [model.lm_head(norm(out.hidden_states[i + 1])) for i in range(LAYERS - 1)] + [out.logits]


def eager_exit_losses(model, input_ids, attention_mask, labels, layers, **ce_options):
    """Per-exit mean token cross-entropy (HF's shift), torchtune-style."""
    logits = exit_logits(model, input_ids, attention_mask)
    target = labels[:, 1:].reshape(-1)
    return [F.cross_entropy(logits[i][:, :-1].reshape(-1, VOCAB), target, ignore_index=-100, **ce_options)
            for i in layers]


def eager_loss(model, input_ids, attention_mask, labels, layers, weights):
    losses = eager_exit_losses(model, input_ids, attention_mask, labels, layers)
    return sum(w * l for w, l in zip(weights, losses))


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_matches_eager(model, layers, weights, **kwargs):
    input_ids, attention_mask, labels = batch()
    ours = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, **kwargs)
    ours_grads = grads(model, ours)
    eager = eager_loss(model, input_ids, attention_mask, labels, layers, weights)
    eager_grads = grads(model, eager)
    torch.testing.assert_close(ours, eager, **LOSS_TOL)
    assert ours_grads.keys() == eager_grads.keys() == {n for n, _ in model.named_parameters()}
    for name in eager_grads:
        torch.testing.assert_close(ours_grads[name], eager_grads[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scale", ["uniform", "linear", "sum", "sqrt", "inverse", "inverse_sqrt"])
def test_loss_and_every_gradient_match_eager(arch, scale):
    model = build(arch)
    layers = [0, 2, 3]
    assert_matches_eager(model, layers, expected_scales(layers, scale, 0.5), exits=[0, 2], scale=scale, e_scale=0.5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("curriculum, step, layers", [
    # exits every 2nd layer (1, 3): the set rolls one layer per step, the last layer kept
    (RotationalCurriculum(), 1, [0, 2, 3]),
    (RotationalCurriculum(), 2, [1, 3]),
    # every layer, all on after 0.5 * 8 steps: layer i from step 4 - i
    (GradualCurriculum(8), 2, [2, 3]),
    (GradualCurriculum(8), 4, [0, 1, 2, 3]),
])
def test_curricula_match_eager_on_their_active_exits(arch, curriculum, step, layers):
    exits = 2 if isinstance(curriculum, RotationalCurriculum) else None
    assert_matches_eager(build(arch), layers, expected_scales(layers, "linear"), exits=exits, scale="linear",
                         curriculum=curriculum, step=step)


def test_curricula_follow_the_training_step():
    rotational, gradual = RotationalCurriculum(), GradualCurriculum(max_steps=8, fraction=0.5)
    assert [rotational.active([1, 3], 4, t) for t in range(5)] == [[1, 3], [0, 2], [1, 3], [0, 2], [1, 3]]
    assert [rotational.active([0, 1], 4, t) for t in range(4)] == [[0, 1], [1, 2], [2, 3], [0, 3]]
    assert [gradual.active([0, 1, 2, 3], 4, t) for t in range(6)] == [
        [], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert gradual.active([1, 3], 4, 3) == [1, 3] and gradual.active([1, 3], 4, 2) == [3]


def test_module_form_steps_its_curriculum():
    model = build("llama")
    loss_fn = EarlyExitLoss(model, exits=[0], curriculum=GradualCurriculum(max_steps=4, fraction=1.0), scale="linear")
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        exit_losses = eager_exit_losses(model, input_ids, attention_mask, labels, [0, 3])
        at_start = loss_fn(input_ids, labels, attention_mask)  # step 0: only the (always kept) last layer
        loss_fn.step(), loss_fn.step(), loss_fn.step(), loss_fn.step()  # step 4: layer 0 is on
        later = loss_fn(input_ids, labels, attention_mask)
        explicit = loss_fn(input_ids, labels, attention_mask, step=0)
    torch.testing.assert_close(at_start, exit_losses[1], **LOSS_TOL)
    torch.testing.assert_close(later, 0.2 * exit_losses[0] + 0.8 * exit_losses[1], **LOSS_TOL)
    torch.testing.assert_close(explicit, at_start)
    restored = EarlyExitLoss(model, exits=[0])
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.training_step == 4


def test_scales_are_torchtunes_normalised_weights():
    layers = resolve_exits(None, LAYERS)
    for scale in SCALE_VALUES:
        for e_scale in (1.0, 0.25):
            torch.testing.assert_close(layer_scales(layers, LAYERS, scale, e_scale),
                                       torch.tensor(expected_scales(layers, scale, e_scale), dtype=torch.float64))
    torch.testing.assert_close(layer_scales([1, 3], LAYERS, "sum"), torch.tensor([2 / 8, 6 / 8], dtype=torch.float64))
    with pytest.raises(ValueError, match="scale: expected one of"):
        layer_scales(layers, LAYERS, "exp")
    with pytest.raises(ValueError, match="weight 0"):
        layer_scales([0, 1], LAYERS, "uniform", e_scale=0.0)


def test_exit_specifications():
    assert resolve_exits(None, 6) == [0, 1, 2, 3, 4, 5]
    assert resolve_exits(2, 6) == [1, 3, 5] and resolve_exits(4, 6) == [3, 5]
    assert resolve_exits(4, 6, include_last=False) == [3]
    assert resolve_exits([0, -2], 6) == [0, 4, 5] and resolve_exits([0, -2], 6, include_last=False) == [0, 4]
    for bad in ([6], [-7], [1.5], 0):
        with pytest.raises(ValueError, match="exits"):
            resolve_exits(bad, 6)


def test_final_norm_is_applied_once():
    # The last exit alone is the model's own LM loss (HF's shift, its own final norm).
    for arch in ARCHS:
        model = build(arch)
        input_ids, attention_mask, labels = batch()
        with torch.no_grad():
            ours = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=[])
            theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        torch.testing.assert_close(ours, theirs, **LOSS_TOL, msg=arch)


def test_default_labels_ignore_padding_and_num_items_sums():
    model = build("qwen2")
    input_ids, attention_mask, labels = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        by_default = early_exit_loss(model, input_ids, attention_mask=attention_mask, exits=2)
        explicit = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=2)
        count = int((labels[:, 1:] != -100).sum())
        summed = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=2,
                                 num_items_in_batch=2 * count)
    torch.testing.assert_close(by_default, explicit)
    torch.testing.assert_close(summed, explicit / 2, **LOSS_TOL)


def test_logits_are_never_built_and_the_head_is_not_called():
    model = build("llama")
    input_ids, attention_mask, labels = batch()
    model.lm_head.register_forward_hook(lambda *a: pytest.fail("lm_head called"))
    seen = []
    original = hf.depth_mixture_nll

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.shape, weight is model.lm_head.weight, kwargs["mode"]))
        return original(hidden, weight, *args, **kwargs)

    hf.depth_mixture_nll = spy
    try:
        early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=2).backward()
    finally:
        hf.depth_mixture_nll = original
    assert seen == [(torch.Size([2, 24, HIDDEN]), True, "expected")]  # one call, every exit stacked


def test_trainer_compute_loss_drop_in(tmp_path):
    model = build("llama")
    input_ids, attention_mask, labels = batch()
    loss_fn = EarlyExitLoss(model, exits=2, scale="sqrt")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        loss, outputs = loss_fn.compute_loss(model, inputs, return_outputs=True)
        expected = loss_fn(input_ids, labels, attention_mask)
    torch.testing.assert_close(loss, expected)
    assert outputs == {"loss": loss}
    # assigned to a real Trainer: one training step runs through it
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")
    dataset = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]} for i in range(2)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    calls = []
    trainer.compute_loss = lambda *a, **k: calls.append(1) or loss_fn.compute_loss(*a, **k)
    before = model.lm_head.weight.detach().clone()
    trainer.train()
    assert calls and not torch.equal(before, model.lm_head.weight.detach())


def _op_accepts(*names):
    return set(names) <= hf._OP_PARAMETERS


def test_per_exit_stats():
    model = build("mistral")
    input_ids, attention_mask, labels = batch()
    if not _op_accepts("return_stats"):
        with pytest.raises(TypeError, match=r"does not accept \['return_stats'\]"):
            early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, return_stats=True)
        return
    with torch.no_grad():
        loss, stats = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=2,
                                      return_stats=True)
        logits = exit_logits(model, input_ids, attention_mask)
    target = labels[:, 1:].reshape(-1)
    kept = target != -100
    nll = [F.cross_entropy(logits[i][:, :-1].reshape(-1, VOCAB), target, ignore_index=-100) for i in (1, 3)]
    accuracy = [(logits[i][:, :-1].reshape(-1, VOCAB).argmax(-1) == target)[kept].float().mean() for i in (1, 3)]
    assert stats.layers == (1, 3) and int(stats.count) == int(kept.sum())
    torch.testing.assert_close(stats.nll, torch.stack(nll), **LOSS_TOL)
    torch.testing.assert_close(stats.accuracy, torch.stack(accuracy))
    torch.testing.assert_close(loss, (stats.weights.float() * stats.nll).sum(), **LOSS_TOL)


@pytest.mark.parametrize("option, value", [("label_smoothing", 0.1), ("softcap", 2.0), ("lse_square_scale", 1e-2)])
def test_lm_options_reach_the_op(option, value):
    model = build("gpt2")
    input_ids, attention_mask, labels = batch()
    if not _op_accepts(option):
        with pytest.raises(TypeError, match=rf"does not accept \['{option}'\]"):
            early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, **{option: value})
        return
    with torch.no_grad():
        ours = early_exit_loss(model, input_ids, labels, attention_mask=attention_mask, exits=[1], **{option: value})
        logits = [exit_logits(model, input_ids, attention_mask)[i][:, :-1].reshape(-1, VOCAB) for i in (1, 3)]
    target = labels[:, 1:].reshape(-1)
    kept = target != -100
    if option == "softcap":
        logits = [value * torch.tanh(z / value) for z in logits]
    smoothing = value if option == "label_smoothing" else 0.0
    per_exit = [F.cross_entropy(z, target, ignore_index=-100, label_smoothing=smoothing) for z in logits]
    if option == "lse_square_scale":  # the z-loss: scale * logsumexp^2 per kept token
        per_exit = [l + value * torch.logsumexp(z, -1)[kept].pow(2).mean() for l, z in zip(per_exit, logits)]
    torch.testing.assert_close(ours, sum(per_exit) / 2, **LOSS_TOL)


def test_unknown_options_and_models_are_clear_errors():
    model = build("llama")
    with pytest.raises(TypeError, match="unexpected options"):
        EarlyExitLoss(model, z_loss=1.0)
    with pytest.raises(TypeError, match="model: expected a Hugging Face"):
        EarlyExitLoss(torch.nn.Linear(3, 3))
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="no exit is active at step 0"):
        early_exit_loss(model, input_ids, labels, curriculum=GradualCurriculum(8), include_last=False)



def test_bench_case_computes_the_eager_loss():
    from udn_kernels.bench import cases
    methods = {m.name: m for m in cases.build("hf-early-exit-step", quick=False, size="tiny")}
    ours, eager = methods["udn early_exit_loss"].forward(), methods["eager materialising"].forward()
    torch.testing.assert_close(ours, eager, **LOSS_TOL)  # the models are copies: same loss


def test_quick_experiment_trains_every_exit(tmp_path):
    import json

    from udn_kernels import cli
    assert cli.main(["experiment", "early-exit-lm", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "early-exit-lm.json").read_text())
    assert (tmp_path / "early-exit-lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in data["runs"].values():
        bits = run["bits"]
        assert run["step"] == [0, 3, 6] and len(bits[0]) == 4
        # held-out bits per byte start near log2(256) = 8 and fall at every exit within 6 steps
        assert all(7.5 < b < 8.5 for b in bits[0]) and all(b1 < b0 for b0, b1 in zip(bits[0], bits[-1]))
    early, last = data["runs"]["early-exit"]["bits"][-1], data["runs"]["last-layer"]["bits"][-1]
    assert early[0] < last[0]  # the first layer's exit is trained only by the early-exit loss


def test_doc_snippets_run():
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "early_exit_lm.md"
    snippets = re.findall(r"<!-- snippet -->\s*```python\n(.*?)```", doc.read_text(), re.S)
    assert snippets
    for index, snippet in enumerate(snippets):
        namespace = {"__name__": f"early_exit_lm_snippet_{index}"}
        exec(compile(snippet, f"docs/early_exit_lm.md snippet {index}", "exec"), namespace)
        assert namespace["loss_fn"].training_step == 3 and torch.isfinite(namespace["loss"])


def test_a_wrapped_model_is_invoked_around_the_loss():
    # A DDP-like wrapper must see the forward: the loss runs as the inner model's forward, called
    # through the wrapper, and the model's own forward is back afterwards.
    model = build("llama")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args):
            self.calls += 1
            return self.module(*args)

    wrapper = Wrapper(model)
    loss_fn = EarlyExitLoss(model, exits=2)
    input_ids, attention_mask, labels = batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        through = loss_fn.compute_loss(wrapper, inputs)
        direct = loss_fn.compute_loss(model, inputs)
    assert wrapper.calls == 1 and "forward" not in model.__dict__
    torch.testing.assert_close(through, direct)
    assert model(input_ids=input_ids).logits.shape == (2, 12, VOCAB)


def test_bench_case_without_transformers_is_reported_not_run(monkeypatch):
    import sys

    from udn_kernels.bench import cases
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    methods = cases.build("hf-early-exit-step", quick=False, size="tiny")
    assert [m.forward for m in methods] == [None] * 3 and all("transformers not installed" in m.missing
                                                               for m in methods)
