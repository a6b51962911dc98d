"""LookSAM against an independent loop written from the paper's Algorithm 2."""

import copy
import math

import pytest
import torch

from msam_fused.variants import LookSAM
from spec_loops import sgd_momentum_step_
from streams import GradientStream, initial_params, relative_error

EPS = 1e-12
HYPERS = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4), dict(lr=0.05, momentum=0.8, weight_decay=1e-3),
          dict(lr=0.2, momentum=0.0, weight_decay=0.0)]
RHO, K, ALPHA, STEPS = 0.1, 3, 0.7, 20


def flat_dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


class SpecLookSAM:
    """Algorithm 2 with SGD (momentum, coupled decay) as the descent rule; vectors are flat."""

    def __init__(self, groups):
        self.groups, self.buffers, self.g_v = groups, {}, None

    def step(self, t, grad_at):
        params = [p for g in self.groups for p in g["params"]]
        g = [grad_at(0, j, p) for j, p in enumerate(params)]
        g_norm = math.sqrt(flat_dot(g, g))
        if t % K == 0:
            w = [p.clone() for p in params]
            for p, gj in zip(params, g):
                p.add_(RHO * gj / (g_norm + EPS))
            g_s = [grad_at(1, j, p) for j, p in enumerate(params)]
            for p, wj in zip(params, w):
                p.copy_(wj)
            proj = flat_dot(g, g_s) / (g_norm ** 2 + EPS)
            self.g_v = [s - proj * gj for s, gj in zip(g_s, g)]
        else:
            gv_norm = math.sqrt(flat_dot(self.g_v, self.g_v))
            g_s = [gj + ALPHA * g_norm / (gv_norm + EPS) * v for gj, v in zip(g, self.g_v)]
        j = 0
        for group in self.groups:
            for p in group["params"]:
                sgd_momentum_step_(p, g_s[j] + group["weight_decay"] * p, self.buffers, j,
                                   group["lr"], group["momentum"])
                j += 1


def make_grad(stream, t):
    shapes = [(gi, i) for gi, ps in enumerate(stream.group_shapes) for i in range(len(ps))]
    return lambda rank, j, p: stream.grad(t * 10 + rank, *shapes[j], p)


def drive(opt, params, stream, steps, start=0, use_closure=False):
    flat = [p for ps in params for p in ps]
    calls = 0
    for t in range(start, start + steps):
        grad = make_grad(stream, t)

        def set_grads(rank):
            for j, p in enumerate(flat):
                p.grad = grad(rank, j, p)

        set_grads(0)
        if use_closure:
            def closure():
                nonlocal calls
                calls += 1
                set_grads(1)
            opt.step(closure)
        elif opt.refresh_due:
            opt.first_step(zero_grad=True)
            set_grads(1)
            opt.second_step()
        else:
            opt.second_step()
        opt.zero_grad()
    return calls


def make_opt(params):
    return LookSAM([{"params": ps, **h} for ps, h in zip(params, HYPERS)], torch.optim.SGD, rho=RHO,
                   k=K, alpha=ALPHA, backend="reference")


def fresh_params():
    return [[p.clone().requires_grad_() for p in ps] for ps in initial_params(torch.float64)]


def test_looksam_matches_algorithm_2():
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False
    params = fresh_params()
    drive(make_opt(params), params, stream, STEPS)
    spec_params = initial_params(torch.float64)
    spec = SpecLookSAM([{"params": ps, **h} for ps, h in zip(spec_params, HYPERS)])
    for t in range(STEPS):
        spec.step(t, make_grad(stream, t))
    assert relative_error([[p.detach() for p in ps] for ps in params], spec_params) <= 1e-12


def test_the_closure_runs_only_on_refresh_steps_and_resume_is_exact():
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False
    by_hand = fresh_params()
    drive(make_opt(by_hand), by_hand, stream, 10)
    params = fresh_params()
    opt = make_opt(params)
    assert drive(opt, params, stream, 4, use_closure=True) == 2  # steps 0 and 3
    saved_params = [[p.detach().clone() for p in ps] for ps in params]
    saved_opt = copy.deepcopy(opt.state_dict())
    resumed_params = [[p.clone().requires_grad_() for p in ps] for ps in saved_params]
    resumed = make_opt(resumed_params)
    resumed.load_state_dict(saved_opt)
    assert drive(resumed, resumed_params, stream, 6, start=4, use_closure=True) == 2  # 6 and 9
    assert all(torch.equal(a, b) for ra, rb in zip(by_hand, resumed_params) for a, b in zip(ra, rb))


def test_misuse_gets_clear_errors():
    params = fresh_params()
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        LookSAM(params[0], torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ValueError, match="adaptive=True is not part of LookSAM"):
        LookSAM(params[0], torch.optim.SGD, adaptive=True, lr=0.1)
    opt = make_opt(params)
    for p in params[0]:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="is a refresh step"):
        opt.second_step()
    opt.first_step(zero_grad=False)
    opt.second_step(zero_grad=False)
    with pytest.raises(RuntimeError, match="is not a refresh step"):
        opt.first_step()
    with pytest.raises(ValueError, match="no 'looksam' entry"):
        opt.load_state_dict(torch.optim.SGD(params[0], lr=0.1).state_dict())
