"""SAM with a multi-step L2 or sign (L-infinity) ascent, against an independent loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import msam_fused
from msam_fused.variants import MultiStepSAM
from spec_loops import sgd_momentum_step_
from streams import GradientStream, initial_params, relative_error
from test_optimizer_api import batch, small_model

EPS = 1e-12
HYPERS = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05),
          dict(lr=0.05, momentum=0.8, weight_decay=1e-3, rho=0.1),
          dict(lr=0.2, momentum=0.0, weight_decay=0.0, rho=0.02)]
STEPS = 30


def spec_step(groups, buffers, grad_at, k, norm):
    """k ascent steps of length rho/k (re-normalized each), then SGD from w with the last gradient."""
    saved = [[p.clone() for p in g["params"]] for g in groups]
    for ascent in range(k):
        g = [[grad_at(ascent, gi, i, p) for i, p in enumerate(gr["params"])] for gi, gr in enumerate(groups)]
        length = math.sqrt(sum(float((t.double() ** 2).sum()) for row in g for t in row))
        for gi, group in enumerate(groups):
            for p, gp in zip(group["params"], g[gi]):
                step = gp / (length + EPS) if norm == "l2" else torch.sign(gp)
                p.add_(group["rho"] / k * step)
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            g2 = grad_at(k, gi, i, p)
            p.copy_(saved[gi][i])
            sgd_momentum_step_(p, g2 + group["weight_decay"] * p, buffers, (gi, i), group["lr"],
                               group["momentum"])


def run(k, norm, use_closure):
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False

    def grad(step, ascent, gi, i, p):
        return stream.grad(step * 10 + ascent, gi, i, p)

    params = [[p.clone().requires_grad_() for p in ps] for ps in initial_params(torch.float64)]
    opt = MultiStepSAM([{"params": ps, **h} for ps, h in zip(params, HYPERS)], torch.optim.SGD,
                       steps=k, norm=norm, backend="reference")
    spec_params = initial_params(torch.float64)
    spec_groups = [{"params": ps, **h} for ps, h in zip(spec_params, HYPERS)]
    buffers = {}
    for step in range(STEPS):
        ascent = [0]

        def set_grads():
            for gi, ps in enumerate(params):
                for i, p in enumerate(ps):
                    p.grad = grad(step, ascent[0], gi, i, p)
            ascent[0] += 1

        set_grads()
        if use_closure:
            opt.step(set_grads)
        else:
            for _ in range(k):
                opt.first_step(zero_grad=True)
                set_grads()
            opt.second_step(zero_grad=True)
        spec_step(spec_groups, buffers, lambda a, gi, i, p: grad(step, a, gi, i, p), k, norm)
    return [[p.detach() for p in ps] for ps in params], spec_params


@pytest.mark.parametrize("k,norm", [(3, "l2"), (1, "linf"), (3, "linf")])
def test_multistep_ascent_matches_the_loop(k, norm):
    ours, expected = run(k, norm, use_closure=False)
    assert relative_error(ours, expected) <= 1e-12


def test_step_with_closure_runs_the_same_k_passes():
    by_hand, _ = run(2, "l2", use_closure=False)
    by_closure, _ = run(2, "l2", use_closure=True)
    assert all(torch.equal(a, b) for ra, rb in zip(by_hand, by_closure) for a, b in zip(ra, rb))


def test_one_l2_step_is_sam_bit_for_bit():
    models = [small_model(), small_model()]
    opts = [msam_fused.SAM(models[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                           backend="reference"),
            MultiStepSAM(models[1].parameters(), torch.optim.SGD, rho=0.05, steps=1, lr=0.1,
                         momentum=0.9, backend="reference")]
    for step in range(4):
        x, y = batch(step)
        for model, opt in zip(models, opts):
            F.cross_entropy(model(x), y).backward()

            def closure(model=model):
                with msam_fused.disable_running_stats(model):
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


def test_the_sign_ascent_lands_on_the_linf_sphere_and_comes_back_exactly():
    model = small_model()
    opt = MultiStepSAM(model.parameters(), torch.optim.SGD, rho=0.01, steps=2, norm="linf",
                       lr=0.0, backend="reference")
    w = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
    offsets = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), w)])
    assert float(offsets.abs().max()) == pytest.approx(0.01, rel=1e-5)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_misuse_gets_clear_errors():
    params = small_model().parameters
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        MultiStepSAM(params(), torch.optim.SGD, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="norm must be one of"):
        MultiStepSAM(params(), torch.optim.SGD, norm="l1", lr=0.1)
    with pytest.raises(ValueError, match="adaptive=True is defined for the L2 ascent only"):
        MultiStepSAM(params(), torch.optim.SGD, norm="linf", adaptive=True, lr=0.1)
    model = small_model()
    opt = MultiStepSAM(model.parameters(), torch.optim.SGD, steps=2, lr=0.1, backend="reference")
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="after 1 of steps=2 ascent steps"):
        opt.second_step()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="more than steps=2 times"):
        opt.first_step()
    opt.second_step(zero_grad=True)
