"""Checkpoints whose model weights are the perturbed or the true weights (docs/checkpoints.md):
both resume, weights of another model or step are an error, and state dicts of torch's SGD and
AdamW warm-start MSAM and AdamW-MSAM (and theirs export back)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused

BACKENDS = ("reference", "cpu")
NAMES = ("MSAM", "AdamWMSAM")
# (parameter dtype, master_weights)
PRECISIONS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
              "bf16-master": (torch.bfloat16, True)}


def build(name, model, backend, master_weights=False, **kw):
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.2}]
    if name == "MSAM":
        return msam_fused.MSAM(groups, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "rho": 0.5,
                                          "backend": backend, "master_weights": master_weights, **kw})
    return msam_fused.AdamWMSAM(groups, **{"lr": 1e-2, "weight_decay": 0.1, "rho": 0.5,
                                           "backend": backend, "master_weights": master_weights, **kw})


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def loss_on(model, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return F.cross_entropy(model(x.to(model[0].weight.dtype)).float(), y)


def train(model, opt, start, stop, closure=False):
    for step in range(start, stop):
        if closure:
            def run():
                opt.zero_grad()
                loss = loss_on(model, step)
                loss.backward()
                return loss
            opt.step(run)
        else:
            loss_on(model, step).backward()
            opt.step()
        opt.zero_grad()


def values(model):
    return [p.detach().clone() for p in model.parameters()]


def snapshot(model, opt):
    return values(model), {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def assert_unchanged(model, opt, snap):
    params, state = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k


@pytest.fixture(scope="module")
def checkpoints():
    """Per (name, backend, precision): the state dict, perturbed and true weights after 4 steps,
    and the perturbed weights of an uninterrupted run after 8."""
    runs = {}
    for name in NAMES:
        for backend in BACKENDS:
            for precision, (dtype, master) in PRECISIONS.items():
                model = make_model(dtype)
                opt = build(name, model, backend, master)
                train(model, opt, 0, 4)
                saved = {"optimizer": copy.deepcopy(opt.state_dict()),
                         "model": copy.deepcopy(model.state_dict()),
                         "true": opt.unperturbed_state_dict(model)}
                train(model, opt, 4, 5)
                saved["next step"] = copy.deepcopy(model.state_dict())
                train(model, opt, 5, 8)
                saved["straight"] = values(model)
                runs[name, backend, precision] = saved
    return runs


CASES = [(n, b, p) for n in NAMES for b in BACKENDS for p in PRECISIONS]


def resumed(case, saved, weights, model_first=True):
    name, backend, precision = case
    dtype, master = PRECISIONS[precision]
    model = make_model(dtype, seed=1)  # other initial weights: only the checkpoint counts
    opt = build(name, model, backend, master)
    if model_first:
        model.load_state_dict(saved[weights])
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    if not model_first:
        model.load_state_dict(saved[weights])
    return model, opt


def assert_within_rounding(model, reference, true_weights):
    """Parameters equal ``reference`` up to rounding ``w + c*x`` and ``w - c*x`` back to the
    parameter dtype (exactly, for float32 here, or with master weights)."""
    for p, q, w in zip(model.parameters(), reference, true_weights.values()):
        bound = 2 * torch.finfo(p.dtype).eps * torch.maximum(q.abs(), w.abs())
        assert ((p.detach().float() - q.float()).abs() <= bound.float()).all()


@pytest.mark.parametrize("case", CASES)
def test_resume_from_the_perturbed_weights_is_bit_identical(case, checkpoints):
    saved = checkpoints[case]
    for model_first in (True, False):
        model, opt = resumed(case, saved, "model", model_first)
        train(model, opt, 4, 8)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved["straight"]))


@pytest.mark.parametrize("case", CASES)
def test_resume_from_the_true_weights_reapplies_the_perturbation_at_load(case, checkpoints):
    saved = checkpoints[case]
    model, opt = resumed(case, saved, "true")
    assert_within_rounding(model, saved["model"].values(), saved["true"])
    if case[2] == "bf16":
        return  # rounding each step: the trajectory stays close, not equal
    if case[2] == "bf16-master":  # the fp32 master is the truth: p comes back bit for bit
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved["model"].values()))
    train(model, opt, 4, 8)
    for p, q in zip(model.parameters(), saved["straight"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_adaptive_groups_resume_from_true_weights_along_the_stored_perturbation(name):
    backend = "reference"  # the fused kernels do not implement adaptive groups
    model = make_model()
    opt = build(name, model, backend, adaptive=True)
    train(model, opt, 0, 4)
    saved = copy.deepcopy(opt.state_dict())
    true = opt.unperturbed_state_dict(model)
    train(model, opt, 4, 7)
    resumed_model = make_model(seed=1)
    resumed_model.load_state_dict(true)
    resumed_opt = build(name, resumed_model, backend, adaptive=True)
    resumed_opt.load_state_dict(saved)
    train(resumed_model, resumed_opt, 4, 7)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == "fp32"])
def test_true_weights_loaded_after_the_optimizer_state(case, checkpoints):
    saved = checkpoints[case]
    # with a closure the first step applies the perturbation before the gradient: exact
    model, opt = resumed(case, saved, "true", model_first=False)
    train(model, opt, 4, 8, closure=True)
    for p, q in zip(model.parameters(), saved["straight"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # unperturbed() first: the true weights inside, the perturbed ones after
    model, opt = resumed(case, saved, "true", model_first=False)
    with opt.unperturbed():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved["true"].values()))
    assert_within_rounding(model, saved["model"].values(), saved["true"])
    # a gradient already taken at the true weights: applied again, and said
    model, opt = resumed(case, saved, "true", model_first=False)
    loss_on(model, 4).backward()
    with pytest.warns(UserWarning, match="gradients were taken at the true weights"):
        opt.step()


@pytest.mark.parametrize("case", CASES)
def test_weights_of_another_model_or_step_are_an_error_that_changes_nothing(case, checkpoints):
    saved = checkpoints[case]
    dtype = PRECISIONS[case[2]][0]
    others = {"fresh model": None, "the next step": saved["next step"],
              "another seed": make_model(dtype, seed=3).state_dict()}
    for what, weights in others.items():
        model, opt = resumed(case, saved, "model", model_first=False)
        if weights is None:
            model.load_state_dict(make_model(dtype, seed=1).state_dict())
        else:
            model.load_state_dict(weights)
        loss_on(model, 4).backward()
        snap = snapshot(model, opt)
        for _ in range(2):  # and again: the check stays until it passes
            with pytest.raises(RuntimeError, match="param group 0 match neither the perturbed.*nor "
                                                   "the true weights.*Load the model weights"):
                opt.step()
            assert_unchanged(model, opt, snap)
        with pytest.raises(RuntimeError, match="match neither"):
            opt.unperturbed_state_dict(model)
        model.load_state_dict(saved["model"])  # the right weights after all
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_without_a_fingerprint_load_unchecked(name, checkpoints):
    saved = checkpoints[name, "reference", "fp32"]
    optimizer_state = copy.deepcopy(saved["optimizer"])
    del optimizer_state["msam_fused"]["weights"]  # as the previous version saved them
    model = make_model()
    opt = build(name, model, "reference")
    opt.load_state_dict(optimizer_state)
    train(model, opt, 4, 5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_inside_unperturbed_and_before_the_model_is_loaded(name, checkpoints):
    saved = checkpoints[name, "reference", "fp32"]
    model, opt = resumed((name, "reference", "fp32"), saved, "model")
    with opt.unperturbed():  # a trainer checkpointing during an unperturbed evaluation
        inside = copy.deepcopy(opt.state_dict())
        true = copy.deepcopy(model.state_dict())
    for weights in (true, saved["model"]):
        model_b = make_model(seed=2)
        model_b.load_state_dict(weights)
        opt_b = build(name, model_b, "reference")
        opt_b.load_state_dict(inside)
        assert_within_rounding(model_b, saved["model"].values(), saved["true"])
    # loaded, model not yet: the state dict is the loaded one, fingerprint included
    opt_c = build(name, make_model(seed=2), "reference")
    opt_c.load_state_dict(copy.deepcopy(saved["optimizer"]))
    again = opt_c.state_dict()["msam_fused"]["weights"]
    for key in ("perturbed", "true"):
        assert torch.equal(again[key], saved["optimizer"]["msam_fused"]["weights"][key])


# ------------------------------------------------------------------------- warm starts
def torch_run(name, model, steps, **kw):
    if name == "MSAM":
        opt = torch.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, **kw})
    else:
        opt = torch.optim.AdamW(model.parameters(), **{"lr": 1e-2, "weight_decay": 0.0, **kw})
    for step in range(steps):
        loss_on(model, step).backward()
        opt.step()
        opt.zero_grad()
    return opt


def as_msam(name, model, backend, rho, **kw):
    if name == "MSAM":
        return msam_fused.MSAM(model.parameters(), **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3,
                                                      "rho": rho, "backend": backend, **kw})
    return msam_fused.AdamWMSAM(model.parameters(), **{"lr": 1e-2, "weight_decay": 0.0, "rho": rho,
                                                       "backend": backend, **kw})


def continue_side_by_side(model_t, torch_opt, model_m, opt):
    """Steps 3-5 with the torch optimizer and with MSAM (``rho = 0``), MSAM's gradients taken
    at ``w`` as torch's are (only the first step's perturbation, if any, makes a difference):
    the weights stay equal."""
    for step in range(3, 6):
        for m, o in ((model_t, torch_opt), (model_m, opt)):
            with opt.unperturbed():
                loss_on(m, step).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model_m.parameters(), model_t.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_warm_start_from_the_torch_optimizer_carries_the_moments_over(name, backend):
    model_t, model_m = make_model(), make_model()
    torch_opt = torch_run(name, model_t, 3)
    torch_run(name, model_m, 3)
    weights = values(model_m)
    opt = as_msam(name, model_m, backend, rho=0.0)
    opt.load_state_dict(torch_opt.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model_m.parameters(), weights))
    for p, q in zip(model_m.parameters(), model_t.parameters()):
        theirs, ours = torch_opt.state[q], opt.state[p]
        assert all(torch.equal(theirs[k].float(), ours[k]) for k in theirs)
        assert float(ours["perturbation_coef"]) == 0.0  # nothing applied yet
    continue_side_by_side(model_t, torch_opt, model_m, opt)  # rho = 0: MSAM is its torch optimizer


def test_warm_start_then_perturbs_from_the_first_step():
    model = make_model()
    sgd = torch_run("MSAM", model, 2)
    opt = as_msam("MSAM", model, "reference", rho=0.5)
    opt.load_state_dict(sgd.state_dict())
    w = values(model)
    v = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    loss_on(model, 2).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.step()
    v = [0.9 * v_ + g_ + 1e-3 * w_ for v_, g_, w_ in zip(v, g, w)]
    w = [w_ - 0.1 * v_ for w_, v_ in zip(w, v)]
    c = 0.5 / torch.cat([v_.flatten() for v_ in v]).norm()
    for p, w_, v_ in zip(model.parameters(), w, v):
        torch.testing.assert_close(p.detach(), w_ - c * v_, rtol=1e-5, atol=1e-6)


def test_warm_start_with_master_weights_takes_weights_loaded_afterwards():
    model = make_model(torch.bfloat16)
    sgd = torch_run("MSAM", model, 2)
    saved_weights = copy.deepcopy(model.state_dict())
    fresh = make_model(torch.bfloat16, seed=4)
    opt = as_msam("MSAM", fresh, "reference", rho=0.5, master_weights=True)
    opt.load_state_dict(sgd.state_dict())
    fresh.load_state_dict(saved_weights)  # after the optimizer state
    with opt.unperturbed():
        assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), saved_weights.values()))
    loss_on(fresh, 2).backward()
    opt.step()
    for p in fresh.parameters():
        s = opt.state[p]
        assert torch.equal(p.detach(), (s["master_weight"] - s["perturbation_coef"] * s["momentum_buffer"]).bfloat16())


def test_warm_start_details_sgd_without_momentum_and_float_steps():
    model = make_model()
    plain = torch_run("MSAM", model, 2, momentum=0.0)
    opt = as_msam("MSAM", model, "reference", rho=0.5, momentum=0.0)
    opt.load_state_dict(plain.state_dict())
    assert all(not s["momentum_buffer"].any() for s in opt.state.values())
    own_model = make_model()
    own = as_msam("AdamWMSAM", own_model, "reference", 0.5)
    train(own_model, own, 0, 2)
    for saved, target in ((torch_run("AdamWMSAM", make_model(), 2).state_dict(), make_model()),
                          (own.state_dict(), own_model)):
        older = copy.deepcopy(saved)
        for state in older["state"].values():
            state["step"] = float(state["step"])  # torch's older format
        opt = as_msam("AdamWMSAM", target, "reference", 0.5)
        opt.load_state_dict(older)
        assert all(s["step"].dtype == torch.float32 and float(s["step"]) == 2.0 for s in opt.state.values())


@pytest.mark.parametrize("kw,match", [({"maximize": True}, "maximize=True"),
                                      ({"nesterov": True}, "nesterov=True is not part of MSAM")])
def test_warm_start_refuses_what_msam_does_not_do(kw, match):
    model = make_model()
    sgd = torch_run("MSAM", model, 1, **kw)
    opt = as_msam("MSAM", model, "reference", 0.5)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sgd.state_dict())
    assert not opt.state
    adam = torch.optim.Adam(model.parameters(), weight_decay=0.1)
    adamw_msam = as_msam("AdamWMSAM", model, "reference", 0.5)
    with pytest.raises(ValueError, match="L2 weight decay"):
        adamw_msam.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_export_to_the_torch_optimizer_continues_as_rho_zero(name):
    model_m = make_model()
    # no decay: MSAM's coupled decay acts at the perturbed point, SGD's at w
    opt = as_msam(name, model_m, "reference", rho=0.5, weight_decay=0.0)
    for step in range(3):
        loss_on(model_m, step).backward()
        opt.step()
        opt.zero_grad()
    model_t = make_model(seed=5)
    model_t.load_state_dict(opt.unperturbed_state_dict(model_m))
    torch_opt = torch_run(name, model_t, 0)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch may alias the tensors
    opt.param_groups[0]["rho"] = 0.0  # MSAM from here on is its torch optimizer
    continue_side_by_side(model_t, torch_opt, model_m, opt)


def test_with_overlap_backward_the_model_is_loaded_first():
    model = make_model()
    opt = build("MSAM", model, "cpu")
    train(model, opt, 0, 4)
    saved = {"optimizer": copy.deepcopy(opt.state_dict()), "true": opt.unperturbed_state_dict(model)}
    opt.overlap_backward(model)
    train(model, opt, 4, 7)
    # model first: checked at load, then every backward runs the overlapped pass as usual
    resumed_model = make_model(seed=1)
    resumed_model.load_state_dict(saved["true"])
    resumed_opt = build("MSAM", resumed_model, "cpu")
    resumed_opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    resumed_opt.overlap_backward(resumed_model)
    train(resumed_model, resumed_opt, 4, 7)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the other order: the first pass would run on unchecked weights; refused, and zero_grad recovers
    late_model = make_model(seed=1)
    late_opt = build("MSAM", late_model, "cpu")
    late_opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    late_opt.overlap_backward(late_model)
    late_model.load_state_dict(saved["true"])
    loss_on(late_model, 4).backward()
    with pytest.raises(RuntimeError, match="load the model weights before opt.load_state_dict"):
        late_opt.step()
    late_opt.zero_grad()
    with late_opt.unperturbed():  # the check passes once no backward is pending
        assert all(torch.equal(p, q) for p, q in zip(late_model.parameters(), saved["true"].values()))
