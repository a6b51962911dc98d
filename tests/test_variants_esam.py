"""ESAM (stochastic weight perturbation + sharpness-sensitive data selection) against an
independent functional loop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from msam_fused.variants import ESAM, train_step
from spec_loops import sgd_momentum_step_
from test_optimizer_api import batch, small_model

EPS = 1e-12
RHO, BETA, GAMMA, LR, MOMENTUM, WD, SEED = 0.1, 0.6, 0.4, 0.1, 0.9, 1e-3, 123


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def forward(weights, x):
    w1, b1, w2, b2 = weights
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def per_sample(weights, x, y):
    return F.cross_entropy(forward(weights, x), y, reduction="none")


def spec_esam(weights, batches):
    """The ESAM step written out: Bernoulli(beta) per tensor, ascent (rho / beta) g / ||g|| on the
    drawn tensors, the ceil(gamma B) samples of largest loss increase, SGD from w."""
    gen = torch.Generator().manual_seed(SEED)
    buffers = {}
    for x, y in batches:
        drawn = (torch.rand(len(weights), generator=gen) < BETA).tolist()
        ws = [w.clone().requires_grad_(d) for w, d in zip(weights, drawn)]
        before = per_sample(ws, x, y)
        chosen = [w for w, d in zip(ws, drawn) if d]
        grads = dict(zip(map(id, chosen), torch.autograd.grad(before.mean(), chosen))) if chosen else {}
        length = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
        perturbed = [(w + RHO / BETA * grads[id(w)] / (length + EPS)).detach().requires_grad_()
                     if id(w) in grads else w.detach().requires_grad_() for w in ws]
        with torch.no_grad():
            increase = per_sample(perturbed, x, y) - before.detach()
        keep = torch.argsort(increase, descending=True)[:math.ceil(GAMMA * len(y))]
        g2 = torch.autograd.grad(per_sample(perturbed, x[keep], y[keep]).mean(), perturbed)
        for j, (w, g) in enumerate(zip(weights, g2)):
            sgd_momentum_step_(w, g + WD * w, buffers, j, LR, MOMENTUM)


def batches(n):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen))
            for _ in range(n)]


def make_esam(model, **kw):
    kw = {"rho": RHO, "beta": BETA, "gamma": GAMMA, "seed": SEED, **kw}
    return ESAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                backend="reference", **kw)


def check_against_loop(make_opt, spec, steps):
    """Train ``mlp()`` with ``make_opt(model)`` and ``train_step``, run ``spec(weights, data)``
    from the same start, compare the weights; returns the optimizer and what ``spec`` returned."""
    data = batches(steps)
    model = mlp()
    weights = [p.detach().clone() for p in model.parameters()]
    opt = make_opt(model)
    for x, y in data:
        train_step(model, opt, x, y)
    result = spec(weights, data)
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    return opt, result


def test_esam_matches_the_written_out_step():
    check_against_loop(make_esam, spec_esam, 12)


def test_without_swp_and_sds_esam_is_sam():
    models = [small_model(), small_model()]
    sam = msam_fused.SAM(models[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                         backend="reference")
    esam = make_esam(models[1], rho=0.05, beta=1.0, gamma=1.0)
    esam.param_groups[0].update(lr=0.1, momentum=0.9, weight_decay=0.0)
    for step in range(3):
        x, y = batch(step)
        for model, opt in zip(models, (sam, esam)):
            train_step(model, opt, x, y)
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


def test_only_the_first_pass_updates_batchnorm_statistics_and_resume_is_exact():
    model, reference = small_model(), small_model()
    opt = make_esam(model)
    x, y = batch(0)
    train_step(model, opt, x, y)
    reference(x)  # one training-mode forward on the whole batch
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for step in (1, 2):
        train_step(model, opt, *batch(step))
    fresh = small_model(seed=5)
    fresh.load_state_dict(saved[0])
    resumed = make_esam(fresh, seed=999)
    resumed.load_state_dict(saved[1])  # the generator state comes back too
    for step in (1, 2):
        train_step(fresh, resumed, *batch(step))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_misuse_gets_clear_errors():
    params = small_model().parameters
    with pytest.raises(ValueError, match="beta and gamma must be > 0"):
        ESAM(params(), torch.optim.SGD, beta=0.0, lr=0.1)
    with pytest.raises(ValueError, match="invalid gamma=1.5"):
        ESAM(params(), torch.optim.SGD, gamma=1.5, lr=0.1)
    with pytest.raises(TypeError, match="needs the per-sample loss function"):
        ESAM(params(), torch.optim.SGD, lr=0.1).step()
