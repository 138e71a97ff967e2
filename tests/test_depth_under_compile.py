"""TruncatedPoisson.max_depth inside torch.compile: the last eagerly computed L, guarded (a new L recompiles)."""
import torch

import udn_kernels.nn as unn


def _set_raw_rate(model, value):
    with torch.no_grad():
        model.depth.raw_rate.fill_(value)


def test_compiled_loss_follows_depth_after_optimizer_step():
    torch.manual_seed(0)
    model = unn.UDN.mlp(2, 8, 3)
    opt = model.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    compiled = torch.compile(lambda: model.loss(x, y, 100), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(), model.loss(x, y, 100), rtol=1e-6, atol=1e-6)
    _set_raw_rate(model, 6.0)  # as if a step had moved the rate: the step hook re-reads L and grows
    opt.zero_grad()
    opt.step()
    depth = model.depth._max_depth
    assert depth > 4 and model.built_depth >= depth
    torch.testing.assert_close(compiled(), model.loss(x, y, 100), rtol=1e-6, atol=1e-6)


def test_loaded_rate_refreshes_depth():
    source, target = unn.TruncatedPoisson(6.0), unn.TruncatedPoisson(1.0)
    target.load_state_dict(source.state_dict())
    assert target._max_depth == source.max_depth
