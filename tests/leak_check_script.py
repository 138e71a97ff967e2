"""Tiny workload for valgrind / LeakSanitizer over the C++ extension (commands in docs/hardening.md):

    PYTHONMALLOC=malloc valgrind --leak-check=full --show-leak-kinds=definite \
        --num-callers=30 python tests/leak_check_script.py

Calls every C++ kernel (forward and backward) a few times on tiny shapes with one thread.
Not a pytest module (no test_ prefix).
"""
import torch

import udn_kernels
from udn_kernels import bernoulli_linear, depth_mixture_nll, gaussian_linear, rng

torch.set_num_threads(1)
assert udn_kernels.available_backends()["cpu"]
for _ in range(3):
    for C in (5, 40):
        h = torch.randn(2, 7, 6, requires_grad=True)
        w = torch.randn(2, C, 6, requires_grad=True)
        b = torch.randn(C, requires_grad=True)
        y = torch.randint(0, C, (7,))
        lw = torch.log_softmax(torch.randn(2), 0)
        depth_mixture_nll(h, w, b, y, lw, mode="mixture").backward()
        s = torch.rand(C, requires_grad=True)
        depth_mixture_nll(h, w[0], None, torch.randn(7, C), lw, likelihood="gaussian", noise_std=s + 0.5).backward()
    x = torch.randn(5, 9, requires_grad=True)
    mu = torch.randn(4, 9, requires_grad=True)
    sigma = torch.rand(4, 9, requires_grad=True)
    for est in ("sample", "local", "flipout"):
        gaussian_linear(x, mu, sigma, mu[:, 0], sigma[:, 0], estimator=est, samples=2, seed=1).sum().backward()
    for mask in ("input", "weight", "symmetric"):
        bernoulli_linear(x, mu, mu[:, 1], p=0.3, mask=mask, samples=2, seed=1).sum().backward()
    for fn in (rng.random_uint32, rng.uniform, rng.normal):
        fn(100, seed=1, offset=2**32 - 50)
    rng.bernoulli(100, 0.3, seed=1)
print("leak_check_script: done")
