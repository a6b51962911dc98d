"""torch.optim behaviour: unperturbed(), param groups, schedulers, GradScaler, non-finite skip."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused

OPTIMIZERS = {
    "MSAM": lambda params, **kw: msam_fused.MSAM(params, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                                 rho=0.5, backend="reference", **kw),
    "AdamWMSAM": lambda params, **kw: msam_fused.AdamWMSAM(params, lr=1e-2, weight_decay=0.1,
                                                           rho=0.5, backend="reference", **kw),
}


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def batch(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (32,), generator=gen)


def train(model, opt, steps, seed=0):
    for step in range(steps):
        x, y = batch(seed + step, next(model.parameters()).dtype)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def assert_unchanged(model, opt, snap):
    params, state = snap
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    assert set(id(p) for p, s in opt.state.items() if s) == set(k for k, s in state.items() if s)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unperturbed_holds_true_weights_and_restores_bit_exactly(name):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 5)
    perturbed = [p.detach().clone() for p in model.parameters()]
    key = opt.direction_key
    with opt.unperturbed():
        for p, before in zip(model.parameters(), perturbed):
            s = opt.state[p]
            torch.testing.assert_close(p.detach(), before + s["perturbation_coef"] * s[key])
        with opt.unperturbed():  # nesting is harmless
            inner = [p.detach().clone() for p in model.parameters()]
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), inner))
        with pytest.raises(RuntimeError, match="inside unperturbed"):
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), perturbed))


def test_unperturbed_state_dict_exports_true_weights_without_changing_the_model():
    model = small_model()
    opt = OPTIMIZERS["MSAM"](model.parameters())
    train(model, opt, 3)
    before = copy.deepcopy(model.state_dict())
    exported = opt.unperturbed_state_dict(model)
    with opt.unperturbed():
        expected = model.state_dict()
        for k in expected:
            assert torch.equal(exported[k], expected[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(exported["0.weight"], before["0.weight"])


def test_param_groups_share_one_global_norm():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = msam_fused.MSAM([{"params": [a], "rho": 1.0}, {"params": [b], "lr": 0.5, "rho": 2.0}],
                          lr=0.1, momentum=0.0, backend="reference")
    a.grad, b.grad = torch.full((3,), 1.0), torch.full((4,), 2.0)
    opt.step()
    norm = float(torch.cat([a.grad, b.grad]).norm())
    assert opt.state[a]["perturbation_coef"].item() == pytest.approx(1.0 / norm)
    assert opt.state[b]["perturbation_coef"].item() == pytest.approx(2.0 / norm)
    torch.testing.assert_close(a.detach(), -0.1 * a.grad - a.grad / norm)
    torch.testing.assert_close(b.detach(), -0.5 * b.grad - 2.0 * b.grad / norm)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_add_param_group_scheduler_and_hyperparameters_between_steps(name):
    model = small_model()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params[:2])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 2)
    sched.step()
    opt.add_param_group({"params": params[2:], "rho": 0.1})
    assert opt.param_groups[1]["lr"] == opt.defaults["lr"]
    opt.param_groups[0]["rho"] = 0.0  # rho changes between steps
    train(model, opt, 2)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.25)
    assert all(opt.state[p] for p in params)
    assert opt.state[params[0]]["perturbation_coef"].item() == 0.0


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_the_whole_step_and_is_counted(name, bad):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 3)
    snap = snapshot(model, opt)
    x, y = batch(99)
    F.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = bad
    opt.step()
    assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    opt.zero_grad()
    train(model, opt, 1)
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_gradient_raises_when_asked_and_changes_nothing(name):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters(), nonfinite="raise")
    train(model, opt, 2)
    snap = snapshot(model, opt)
    x, y = batch(7)
    F.cross_entropy(model(x), y).backward()
    model[3].bias.grad[1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient.*parameter 5 of param group 0"):
        opt.step()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_unscales_in_the_step_and_skips_on_inf(name):
    model_a, model_b = small_model(), small_model()
    opt_a, opt_b = OPTIMIZERS[name](model_a.parameters()), OPTIMIZERS[name](model_b.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for step in range(4):
        x, y = batch(step)
        scaler.scale(F.cross_entropy(model_a(x), y)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.step()
        opt_b.zero_grad()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    snap = snapshot(model_a, opt_a)
    x, y = batch(11)
    scaler.scale(F.cross_entropy(model_a(x), y)).backward()
    model_a[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt_a)
    scaler.update()
    assert_unchanged(model_a, opt_a, snap)
    assert scaler.get_scale() == 2.0 ** 9


def test_gradient_clipping_before_step_is_the_clipped_gradient():
    p = torch.zeros(4, requires_grad=True)
    opt = msam_fused.MSAM([p], lr=1.0, momentum=0.0, rho=0.0, backend="reference")
    p.grad = torch.full((4,), 10.0)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.5))


def test_bfloat16_params_keep_float32_state_and_master_weights():
    model = small_model(dtype=torch.bfloat16)
    opt = msam_fused.MSAM(model.parameters(), lr=0.1, rho=0.5, backend="reference", master_weights=True)
    train(model, opt, 3)
    for p in model.parameters():
        s = opt.state[p]
        assert s["momentum_buffer"].dtype == torch.float32 and s["master_weight"].dtype == torch.float32
        # the bf16 parameter is the rounded perturbed master weight
        expected = (s["master_weight"] - s["perturbation_coef"] * s["momentum_buffer"]).bfloat16()
        assert torch.equal(p.detach(), expected)
    with opt.unperturbed():
        for p in model.parameters():
            assert torch.equal(p.detach(), opt.state[p]["master_weight"].bfloat16())


def test_deepcopy_gives_an_independent_working_optimizer():
    model = small_model()
    opt = OPTIMIZERS["MSAM"](model.parameters())
    train(model, opt, 2)
    model2 = copy.deepcopy(model)
    opt2 = type(opt)(model2.parameters(), backend="reference")
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 3, seed=5)
    train(model2, opt2, 3, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_auto_backend_resolves_and_named_backends_explain_what_is_missing():
    p = torch.zeros(2, requires_grad=True)
    assert msam_fused.MSAM([p]).backend in {"cpu", "reference"}
    reasons = msam_fused.available_backends("cpu")
    assert reasons["reference"] is None
    with pytest.raises(msam_fused.BackendUnavailableError, match="cuda"):
        msam_fused.MSAM([p], backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        msam_fused.MSAM([p], backend="fast")
