"""The reference optimizers against independent per-tensor loops written from the spec."""

import pytest
import torch

import msam_fused
from spec_loops import SpecAdamWMSAM, SpecMSAM, spec_sam_sgd_step
from streams import ADAMW_HYPERS, MSAM_HYPERS, GradientStream, initial_params, relative_error

STEPS = 100


def run_optimizer(cls, hypers, dtype, steps=STEPS, change_rho_at=(40, 70)):
    """Drive msam_fused's reference backend with the gradient stream; return params and w."""
    params = [[p.clone().requires_grad_() for p in ps] for ps in initial_params(dtype)]
    opt = cls([{"params": ps, **h} for ps, h in zip(params, hypers)], backend="reference")
    stream = GradientStream()
    for step in range(steps):
        _change_rho(opt.param_groups, step, change_rho_at)
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                p.grad = stream.grad(step, gi, i, p)
        opt.step()
    with opt.unperturbed():
        true = [[p.detach().clone() for p in ps] for ps in params]
    return [[p.detach() for p in ps] for ps in params], true


def run_spec(spec_cls, hypers, dtype, steps=STEPS, change_rho_at=(40, 70)):
    params = initial_params(dtype)
    groups = [{"params": ps, **h} for ps, h in zip(params, hypers)]
    spec = spec_cls(groups)
    stream = GradientStream()
    for step in range(steps):
        _change_rho(groups, step, change_rho_at)
        spec.step(stream.grads(step, params))
    return params, spec


def _change_rho(groups, step, at):
    if step == at[0]:
        for g in groups:
            g["rho"] *= 2.5
    if step == at[1]:
        groups[0]["rho"] = 0.0


@pytest.mark.parametrize("cls,spec_cls,hypers", [
    (msam_fused.MSAM, SpecMSAM, MSAM_HYPERS),
    (msam_fused.AdamWMSAM, SpecAdamWMSAM, ADAMW_HYPERS),
], ids=["MSAM", "AdamWMSAM"])
def test_float64_matches_spec_loop(cls, spec_cls, hypers):
    params, _ = run_optimizer(cls, hypers, torch.float64)
    expected, _ = run_spec(spec_cls, hypers, torch.float64)
    assert relative_error(params, expected) <= 1e-12


def test_msam_true_weights_match_spec_loop():
    _, true = run_optimizer(msam_fused.MSAM, MSAM_HYPERS, torch.float64)
    _, spec = run_spec(SpecMSAM, MSAM_HYPERS, torch.float64)
    assert relative_error(true, spec.true_weights()) <= 1e-12


@pytest.mark.parametrize("cls,spec_cls,hypers", [
    (msam_fused.MSAM, SpecMSAM, MSAM_HYPERS),
    (msam_fused.AdamWMSAM, SpecAdamWMSAM, ADAMW_HYPERS),
], ids=["MSAM", "AdamWMSAM"])
def test_float32_within_twice_the_spec_loops_own_error(cls, spec_cls, hypers):
    """docs/design.md, "Numerics": against a float64 run, at most 2x the error of the same loop in float32."""
    exact, _ = run_spec(spec_cls, hypers, torch.float64)
    spec32, _ = run_spec(spec_cls, hypers, torch.float32)
    ours32, _ = run_optimizer(cls, hypers, torch.float32)
    own_error = relative_error(spec32, exact)
    assert 0 < own_error < 1e-3
    assert relative_error(ours32, exact) <= 2 * own_error + 1e-9


def test_parameter_without_gradient_keeps_weights_and_momentum():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    opt = msam_fused.MSAM([p, q], lr=0.1, momentum=0.9, rho=0.3, backend="reference")
    p.grad, q.grad = torch.tensor([0.2, 0.1], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    with opt.unperturbed():
        w_before = p.detach().clone()
    v_before = opt.state[p]["momentum_buffer"].clone()
    p.grad, q.grad = None, torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], v_before)
    with opt.unperturbed():
        torch.testing.assert_close(p.detach(), w_before, rtol=0, atol=1e-15)
    # the new coefficient is applied to p as well: p = w - c_new * v
    c_new = opt.state[q]["perturbation_coef"]
    torch.testing.assert_close(p.detach(), w_before - c_new * v_before, rtol=0, atol=1e-15)


def test_frozen_parameter_is_never_touched():
    frozen = torch.randn(4, requires_grad=False)
    live = torch.randn(4, requires_grad=True)
    before = frozen.clone()
    opt = msam_fused.MSAM([frozen, live], lr=0.1, rho=1.0, weight_decay=0.1, backend="reference")
    for _ in range(3):
        live.grad = torch.randn(4)
        opt.step()
    assert torch.equal(frozen, before) and not opt.state.get(frozen)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_two_pass_loop(adaptive):
    hypers = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05),
              dict(lr=0.05, momentum=0.8, weight_decay=1e-3, rho=0.1),
              dict(lr=0.2, momentum=0.0, weight_decay=0.0, rho=0.2)]
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False  # SAM's passes use every parameter
    params = [[p.clone().requires_grad_() for p in ps] for ps in initial_params(torch.float64)]
    sam = msam_fused.SAM([{"params": ps, **h} for ps, h in zip(params, hypers)], torch.optim.SGD,
                         adaptive=adaptive, backend="reference")
    spec_params = initial_params(torch.float64)
    spec_groups = [{"params": ps, **h} for ps, h in zip(spec_params, hypers)]
    buffers = {}
    for step in range(STEPS):
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                p.grad = stream.grad(step, gi, i, p)
        sam.first_step(zero_grad=True)
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                p.grad = stream.grad(step + 10_000, gi, i, p)
        sam.second_step(zero_grad=True)
        spec_sam_sgd_step(spec_groups, buffers, _spec_grad_fn(stream, step), adaptive=adaptive)
    assert relative_error([[p.detach() for p in ps] for ps in params], spec_params) <= 1e-12


def _spec_grad_fn(stream, step):
    seen = set()

    def grad_at(gi, i, p):
        # the first call for (gi, i) is the ascent gradient, the second the descent gradient
        offset = 10_000 if (gi, i) in seen else 0
        seen.add((gi, i))
        return stream.grad(step + offset, gi, i, p)
    return grad_at
