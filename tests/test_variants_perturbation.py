"""Adaptive (ASAM-style) and perturb=False groups for MSAM, AdamW-MSAM and SAM, against
independent loops that keep the true weights w explicitly (the optimizers reconstruct them)."""

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from msam_fused import backends
from msam_fused.variants import perturbation_param_groups
from streams import ADAMW_HYPERS, MSAM_HYPERS, GradientStream, initial_params, relative_error
from test_optimizer_api import batch, small_model
from spec_loops import spec_sam_sgd_step
from test_reference_vs_spec import _spec_grad_fn, run_optimizer, run_spec

EPS = 1e-12
# group 0 adaptive, group 1 never perturbed, group 2 adaptive (its first parameter gets its
# first gradient only at step 10, another one skips every third step: see streams.py)
FLAGS = [dict(adaptive=True), dict(perturb=False), dict(adaptive=True)]


class SpecTrueWeights:
    """MSAM (``adam=False``) or AdamW-MSAM with per-group ``adaptive``/``perturb``, keeping
    ``w`` itself; the parameter is written as ``w - c * x`` after every step, with
    ``x = w**2 * v`` (adaptive), ``v``, and ``c = rho / || (|w|) v ||`` over perturbed groups."""

    def __init__(self, groups, adam):
        self.groups, self.adam = groups, adam
        self.w, self.v, self.s, self.t = {}, {}, {}, {}
        self.c = [0.0] * len(groups)

    def step(self, grads):
        sq = 0.0
        for gi, group in enumerate(self.groups):
            for i, p in enumerate(group["params"]):
                g, key = grads[gi][i], (gi, i)
                if g is None and key not in self.w:
                    continue
                if key not in self.w:
                    self.w[key], self.v[key], self.s[key], self.t[key] = (
                        p.clone(), torch.zeros_like(p), torch.zeros_like(p), 0)
                w, v = self.w[key], self.v[key]
                if g is not None and not self.adam:
                    v.mul_(group["momentum"]).add_(g + group["weight_decay"] * p)  # decay at p
                    w.sub_(group["lr"] * v)
                elif g is not None:
                    b1, b2 = group["betas"]
                    self.t[key] += 1
                    t = self.t[key]
                    v.mul_(b1).add_((1 - b1) * g)
                    self.s[key].mul_(b2).add_((1 - b2) * g * g)
                    denom = self.s[key].sqrt() / math.sqrt(1 - b2 ** t) + group["eps"]
                    w.sub_(group["lr"] / (1 - b1 ** t) * v / denom)
                    w.mul_(1 - group["lr"] * group["weight_decay"])
                if group.get("perturb", True):
                    term = w.abs() * v if group.get("adaptive") else v
                    sq += float((term ** 2).sum())
        norm = math.sqrt(sq)
        for gi, group in enumerate(self.groups):
            self.c[gi] = group["rho"] / (norm + EPS) if group.get("perturb", True) else 0.0
            for i, p in enumerate(group["params"]):
                key = (gi, i)
                if key in self.w:
                    w, v = self.w[key], self.v[key]
                    x = w * w * v if group.get("adaptive") else v
                    p.copy_(w - self.c[gi] * x)

    def true_weights(self):
        return [[self.w.get((gi, i), p) for i, p in enumerate(g["params"])]
                for gi, g in enumerate(self.groups)]


def spec_cls(adam):
    return lambda groups: SpecTrueWeights(groups, adam)


CASES = [(msam_fused.MSAM, False, MSAM_HYPERS), (msam_fused.AdamWMSAM, True, ADAMW_HYPERS)]


@pytest.mark.parametrize("cls,adam,hypers", CASES, ids=["MSAM", "AdamWMSAM"])
def test_float64_adaptive_and_unperturbed_groups_match_the_true_weight_loop(cls, adam, hypers):
    hypers = [{**h, **f} for h, f in zip(hypers, FLAGS)]
    params, true = run_optimizer(cls, hypers, torch.float64)  # includes rho changes
    expected, spec = run_spec(spec_cls(adam), hypers, torch.float64)
    assert relative_error(params, expected) <= 1e-12
    assert relative_error(true, spec.true_weights()) <= 1e-12
    # the unperturbed group holds its true weights exactly
    assert all(torch.equal(p, w) for p, w in zip(params[1], true[1]))


@pytest.mark.parametrize("cls,adam,hypers", CASES, ids=["MSAM", "AdamWMSAM"])
def test_float32_adaptive_within_twice_the_loops_own_error(cls, adam, hypers):
    hypers = [{**h, **f} for h, f in zip(hypers, FLAGS)]
    exact, _ = run_spec(spec_cls(adam), hypers, torch.float64)
    spec32, _ = run_spec(spec_cls(adam), hypers, torch.float32)
    ours32, _ = run_optimizer(cls, hypers, torch.float32)
    own_error = relative_error(spec32, exact)
    assert 0 < own_error < 1e-3
    assert relative_error(ours32, exact) <= 2 * own_error + 1e-9


def adaptive_msam(model, **kw):
    groups = perturbation_param_groups(model, adaptive="weights")
    return msam_fused.MSAM(groups, lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.5,
                           backend="reference", **kw)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_adaptive_unperturbed_round_trip_and_resume_are_exact():
    model = small_model()
    opt = adaptive_msam(model)
    train(model, opt, 5)
    perturbed = [p.detach().clone() for p in model.parameters()]
    with opt.unperturbed():
        true = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))
    # p = w - c * x with the stored x, and x = w**2 * v for the scaled tensors
    for p, w in zip(model.parameters(), true):
        state = opt.state[p]
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        assert ("perturbation" in state) == group["adaptive"]
        if group["adaptive"]:
            torch.testing.assert_close(state["perturbation"], w * w * state["momentum_buffer"],
                                       rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(p, w - state["perturbation_coef"] * state["perturbation"],
                                       rtol=0, atol=1e-6)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    train(model, opt, 4, start=5)
    fresh = small_model(seed=1)
    fresh.load_state_dict(saved_model)
    resumed = adaptive_msam(fresh)
    resumed.load_state_dict(saved_opt)
    train(fresh, resumed, 4, start=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_changing_adaptive_after_the_first_step_is_refused_and_changes_nothing():
    model = small_model()
    opt = msam_fused.MSAM(model.parameters(), lr=0.1, rho=0.5, backend="reference")
    train(model, opt, 2)
    opt.param_groups[0]["adaptive"] = True
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(9)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="adaptive cannot change"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="perturb must be True or False"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "perturb": "no"})


def test_backends_without_adaptive_support_fail_clearly_or_fall_back_under_auto():
    fake = SimpleNamespace(name="fake", capabilities=frozenset({backends.STASH}))
    with pytest.raises(backends.BackendUnavailableError, match="backend 'fake' does not implement"):
        backends.with_capability(fake, backends.ADAPTIVE, "cuda", "MSAM(adaptive=True)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.with_capability(fake, backends.ADAPTIVE, "auto", "MSAM(adaptive=True)") \
            is msam_fused.reference
    assert any("runs on the 'reference' backend" in str(w.message) for w in caught)
    assert backends.with_capability(msam_fused.reference, backends.ADAPTIVE, "cpu", "x") is msam_fused.reference


def test_an_explicit_backend_without_adaptive_support_is_refused_at_construction(monkeypatch):
    monkeypatch.setattr(msam_fused.reference, "capabilities", frozenset({backends.STASH}))
    with pytest.raises(backends.BackendUnavailableError, match="adaptive"):
        msam_fused.MSAM(small_model().parameters(), rho=0.5, adaptive=True, backend="reference")


def test_sam_with_adaptive_and_unperturbed_groups_matches_the_two_pass_loop():
    hypers = [dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05, adaptive=True),
              dict(lr=0.05, momentum=0.8, weight_decay=1e-3, rho=0.1, adaptive=False, perturb=False),
              dict(lr=0.2, momentum=0.5, weight_decay=0.0, rho=0.2, adaptive=False)]
    stream = GradientStream()
    stream.missing = lambda step, gi, i: False
    params = [[p.clone().requires_grad_() for p in ps] for ps in initial_params(torch.float64)]
    sam = msam_fused.SAM([{"params": ps, **h} for ps, h in zip(params, hypers)], torch.optim.SGD,
                         backend="reference")
    spec_params = initial_params(torch.float64)
    spec_groups = [{"params": ps, **h} for ps, h in zip(spec_params, hypers)]
    buffers = {}
    for step in range(50):
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                p.grad = stream.grad(step, gi, i, p)
        sam.first_step(zero_grad=True)
        assert all(p.grad is None for p in params[1])
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                p.grad = stream.grad(step + 10_000, gi, i, p)
        sam.second_step(zero_grad=True)
        spec_sam_sgd_step(spec_groups, buffers, _spec_grad_fn(stream, step))
    assert relative_error([[p.detach() for p in ps] for ps in params], spec_params) <= 1e-12


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(1, 2)
        self.head = nn.Linear(8, 3, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(8))


def test_param_groups_select_normalization_layers_and_asam_weights():
    net = TinyNet()
    names = {id(p): n for n, p in net.named_parameters()}

    def summary(groups):
        return {(g["perturb"], g["adaptive"]): sorted(names[id(p)] for p in g["params"]) for g in groups}

    norm_only = summary(perturbation_param_groups(net, perturb="norm"))
    assert norm_only == {
        (False, False): ["cls_token", "conv.bias", "conv.weight", "head.weight"],
        (True, False): ["bn.bias", "bn.weight", "gn.bias", "gn.weight", "ln.bias", "ln.weight"]}
    asam = summary(perturbation_param_groups(net, adaptive="weights"))
    assert asam == {
        (True, True): ["bn.weight", "conv.weight", "gn.weight", "head.weight", "ln.weight"],
        (True, False): ["bn.bias", "cls_token", "conv.bias", "gn.bias", "ln.bias"]}
    every = perturbation_param_groups(net, adaptive="all", lr=0.3)
    assert len(every) == 1 and every[0]["adaptive"] and every[0]["lr"] == 0.3
    assert len(every[0]["params"]) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="perturb must be one of"):
        perturbation_param_groups(net, perturb="bn")


def test_norm_only_msam_perturbs_only_normalization_parameters():
    model = small_model()
    groups = perturbation_param_groups(model, perturb="norm")
    opt = msam_fused.MSAM(groups, lr=0.1, momentum=0.9, rho=0.5, backend="reference")
    train(model, opt, 3)
    with opt.unperturbed():
        true = [p.detach().clone() for p in model.parameters()]
    moved = [not torch.equal(p, w) for p, w in zip(model.parameters(), true)]
    assert moved == [False, False, True, True, False, False]  # Linear, Linear, BN w/b, Linear
    bn_x = [opt.state[p]["momentum_buffer"] for p in model[1].parameters()]
    offsets = [w - p.detach() for p, w in zip(model[1].parameters(), true[2:4])]
    radius = math.sqrt(sum(float((o.double() ** 2).sum()) for o in offsets))
    assert radius == pytest.approx(0.5, rel=1e-5)  # the whole rho goes to the BN parameters
    assert bn_x[0].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cls,adam,hypers", CASES, ids=["MSAM", "AdamWMSAM"])
def test_adaptive_and_unperturbed_groups_on_cuda_match_the_cpu_run(cls, adam, hypers):
    hypers = [{**h, **f} for h, f in zip(hypers, FLAGS)]
    cpu, cpu_true = run_optimizer(cls, hypers, torch.float64, steps=30)
    params = [[p.clone().cuda().requires_grad_() for p in ps] for ps in initial_params(torch.float64)]
    opt = cls([{"params": ps, **h} for ps, h in zip(params, hypers)], backend="reference")
    stream = GradientStream()
    for step in range(30):
        for gi, ps in enumerate(params):
            for i, p in enumerate(ps):
                g = stream.grad(step, gi, i, p.detach().cpu())
                p.grad = None if g is None else g.cuda()
        opt.step()
    with opt.unperturbed():
        true = [[p.detach().cpu().clone() for p in ps] for ps in params]
    assert relative_error([[p.detach().cpu() for p in ps] for ps in params], cpu) <= 1e-12
    assert relative_error(true, cpu_true) <= 1e-12
