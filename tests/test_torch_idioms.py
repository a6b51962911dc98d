"""Ordinary torch.optim code, ported as is: param-group idioms of the torch.optim docs,
deepcopy and pickling, non-finite hyper-parameters, export from a foreign model, and SAM
driven by a closure the way torch drives optimizers. Each idiom either works as in torch or
raises; none may silently do something else."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused

BACKENDS = ("reference", "cpu")


def build(name, params, backend, **kw):
    if name == "MSAM":
        return msam_fused.MSAM(params, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3,
                                          "rho": 0.5, "backend": backend, **kw})
    if name == "AdamWMSAM":
        return msam_fused.AdamWMSAM(params, **{"lr": 1e-2, "weight_decay": 0.1, "rho": 0.5,
                                               "backend": backend, **kw})
    return msam_fused.SAM(params, torch.optim.SGD, **{"rho": 0.1, "lr": 0.1, "momentum": 0.9,
                                                      "backend": backend, **kw})


NAMES = ("MSAM", "AdamWMSAM", "SAM")


class Net(nn.Module):
    """The torch.optim docs' shape: a ``base`` and a ``classifier``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.base = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16))
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.base(x)))


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        if isinstance(opt, msam_fused.SAM):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)  # no gradient yet: the closure runs at w and at w + e
        else:
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ param-group idioms
def docs_idioms(model):
    """Each idiom of the torch.optim docs' param-group section (and its common variants) as a
    builder of the constructor's ``params``, next to the plain-list groups it stands for."""
    base, head = list(model.base.parameters()), list(model.classifier.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return {
        "generator per group": (
            lambda: [{"params": model.base.parameters()}, {"params": model.classifier.parameters(), "lr": 0.05}],
            [{"params": base}, {"params": head, "lr": 0.05}]),
        "filter requires_grad": (
            lambda: [{"params": filter(lambda p: p.requires_grad, model.parameters())}],
            [{"params": base + head}]),
        "map inside a group": (
            lambda: [{"params": map(lambda p: p, model.base.parameters())}, {"params": iter(head)}],
            [{"params": base}, {"params": head}]),
        "bare generator": (lambda: model.parameters(), base + head),
        "named parameters": (lambda: model.named_parameters(), base + head),
        "named groups, no decay on biases and norms": (
            lambda: [{"params": ((n, p) for n, p in model.named_parameters() if p.dim() > 1)},
                     {"params": [(n, p) for n, p in model.named_parameters() if p.dim() <= 1],
                      "weight_decay": 0.0}],
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]),
        "single tensor group": (
            lambda: [{"params": model.classifier.weight}, {"params": [*base, model.classifier.bias]}],
            [{"params": [model.classifier.weight]}, {"params": [*base, model.classifier.bias]}]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("idiom", list(docs_idioms(Net())))
def test_param_group_idioms_of_the_torch_docs_train_as_plain_lists(name, backend, idiom):
    model_a, model_b = Net(), Net()
    given, _ = docs_idioms(model_a)[idiom]
    _, lists = docs_idioms(model_b)[idiom]
    opt_a, opt_b = build(name, given(), backend), build(name, lists, backend)
    assert [len(g["params"]) for g in opt_a.param_groups] == [len(g["params"]) for g in opt_b.param_groups]
    before = params_of(model_a)
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert_same(model_a.parameters(), model_b.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model_a.parameters(), before))  # all trained


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_takes_generators_and_filters(name, backend):
    model_a, model_b = Net(), Net()
    opt_a = build(name, model_a.base.parameters(), backend)
    opt_a.add_param_group({"params": filter(lambda p: p.requires_grad, model_a.classifier.parameters()),
                           "lr": 0.05})
    opt_b = build(name, list(model_b.base.parameters()), backend)
    opt_b.add_param_group({"params": list(model_b.classifier.parameters()), "lr": 0.05})
    assert len(opt_a.param_groups[1]["params"]) == 2
    train(model_a, opt_a, 3)
    train(model_b, opt_b, 3)
    assert_same(model_a.parameters(), model_b.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_malformed_param_lists_raise_as_torch_does(name):
    model = Net()
    w, b = model.classifier.weight, model.classifier.bias
    for params, error, match in [
        ([("w", w), b], ValueError, "with/without names"),
        ([w, ("b", b)], ValueError, "with/without names"),
        ([{"params": {w, b}}], TypeError, "ordered collections"),
        ([{"params": [model.classifier]}], TypeError, "[Ll]inear.*optimize [tT]ensors|optimize [tT]ensors.*[Ll]inear"),
    ]:
        with pytest.raises(error, match=match):
            build(name, params, "reference")
        opt = build(name, [w], "reference")
        with pytest.raises(error, match=match):
            opt.add_param_group({"params": params[0]["params"] if isinstance(params[0], dict) else params})
        assert len(opt.param_groups) == 1


# --------------------------------------------------------------------- deepcopy / pickle
def round_trips():
    def pickled(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return {"deepcopy": copy.deepcopy, "torch.save": pickled}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", list(round_trips()))
def test_copies_keep_every_setting_and_continue_identically(name, backend, how):
    kw = {"nonfinite": "raise"} if name == "SAM" else {"nonfinite": "raise", "master_weights": True}
    model = Net()
    opt = build(name, [{"params": model.base.parameters()},
                       {"params": model.classifier.parameters(), "rho": 0.2}], backend, **kw)
    train(model, opt, 2)
    model_c, opt_c = round_trips()[how]((model, opt))
    assert (opt_c.backend_request, opt_c.nonfinite, opt_c.backend) == (backend, "raise", opt.backend)
    assert {**opt_c.defaults, "differentiable": False} == {**opt.defaults, "differentiable": False}
    if name == "SAM":
        assert opt_c.param_groups is opt_c.base_optimizer.param_groups
        assert opt_c.state is opt_c.base_optimizer.state
    else:
        assert opt_c.master_weights
    train(model, opt, 3, start=2)
    train(model_c, opt_c, 3, start=2)
    assert_same(model.parameters(), model_c.parameters())
    x, y = batch(9)
    F.cross_entropy(model_c(x), y).backward()
    model_c.classifier.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt_c.first_step() if name == "SAM" else opt_c.step()


def test_sam_variants_survive_a_copy():
    from msam_fused.variants import LookSAM, MultiStepSAM

    for cls, kw in ((MultiStepSAM, {"steps": 2}), (LookSAM, {"k": 3})):
        model = Net()
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference", **kw)
        copied = copy.deepcopy(opt)
        assert {k: getattr(copied, k) for k in kw} == kw


def test_sam_refuses_a_copy_between_its_two_passes():
    model = Net()
    opt = build("SAM", model.parameters(), "reference")
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        copy.deepcopy(opt)


# ------------------------------------------------------------- non-finite hyper-parameters
HYPERPARAMETERS = {"MSAM": ("lr", "momentum", "weight_decay", "rho"),
                   "AdamWMSAM": ("lr", "betas0", "betas1", "eps", "weight_decay", "rho"),
                   "SAM": ("rho",)}
NONFINITE = (float("inf"), float("-inf"), float("nan"))


def with_value(group_or_kwargs, key, value):
    if key.startswith("betas"):
        betas = list(group_or_kwargs.get("betas", (0.9, 0.999)))
        betas[int(key[-1])] = value
        return "betas", tuple(betas)
    return key, value


@pytest.mark.parametrize("name,key", [(n, k) for n in NAMES for k in HYPERPARAMETERS[n]])
@pytest.mark.parametrize("value", NONFINITE)
def test_nonfinite_hyperparameters_are_refused_in_the_constructor(name, key, value):
    model = Net()
    k, v = with_value({}, key, value)
    with pytest.raises(ValueError, match=f"{k}.*must be finite"):
        build(name, model.parameters(), "reference", **{k: v})
    with pytest.raises(ValueError, match="must be finite"):
        build(name, [{"params": model.base.parameters(), k: v}], "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,key", [(n, k) for n in NAMES for k in HYPERPARAMETERS[n]])
@pytest.mark.parametrize("value", NONFINITE)
def test_nonfinite_hyperparameters_set_between_steps_change_nothing(name, key, value, backend):
    model = Net()
    opt = build(name, [{"params": model.base.parameters()}, {"params": model.classifier.parameters()}],
                backend)
    train(model, opt, 2)
    before = params_of(model)
    state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    group = opt.param_groups[1]
    k, v = with_value(group, key, value)
    group[k] = v
    with pytest.raises(ValueError, match="param group 1.*must be finite"):
        train(model, opt, 1, start=2)
    assert_same(model.parameters(), before)
    for p, s in opt.state.items():
        for name_, value_ in s.items():
            if torch.is_tensor(value_):
                assert torch.equal(value_, state[p][name_])


# ------------------------------------------------------------------ export, foreign model
@pytest.mark.parametrize("name", ("MSAM", "AdamWMSAM"))
def test_export_from_a_model_that_does_not_hold_the_parameters_is_an_error(name):
    model, other = Net(), Net(seed=1)
    opt = build(name, model.parameters(), "reference")
    train(model, opt, 2)
    with pytest.raises(ValueError, match="does not hold 8 of the optimizer's 8 parameters"):
        opt.unperturbed_state_dict(other)
    with pytest.raises(ValueError, match="does not hold 2 of the optimizer's 8 parameters .the first: parameter 6 "):
        opt.unperturbed_state_dict(model.base)
    # a model holding more than the optimizer (frozen parts) is fine
    frozen = nn.Sequential(model, nn.Linear(3, 3).requires_grad_(False))
    exported = opt.unperturbed_state_dict(frozen)
    assert set(exported) == set(frozen.state_dict())


# ------------------------------------------------------------------ SAM and the closure
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_closure_from_a_state_without_gradients_is_a_whole_sam_step(backend):
    model_a, model_b = Net(), Net()
    opt_a = build("SAM", model_a.parameters(), backend)
    opt_b = build("SAM", model_b.parameters(), backend)
    for step in range(4):
        x, y = batch(step)

        def closure():  # as Lightning's automatic optimization builds it
            opt_a.zero_grad()
            loss = F.cross_entropy(model_a(x), y)
            loss.backward()
            return loss

        loss = opt_a.step(closure)
        expected = F.cross_entropy(model_b(x), y)
        expected.backward()
        opt_b.first_step(zero_grad=True)
        F.cross_entropy(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
        assert torch.equal(loss.detach(), expected.detach())  # the loss at w, as torch returns it
        assert_same(model_a.parameters(), model_b.parameters())
        opt_a.zero_grad()


def test_sam_closure_after_the_first_backward_keeps_the_original_convention():
    model_a, model_b = Net(), Net()
    opt_a, opt_b = build("SAM", model_a.parameters(), "reference"), build("SAM", model_b.parameters(), "reference")
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model_a(x), y)
        loss.backward()
        return loss

    F.cross_entropy(model_a(x), y).backward()
    opt_a.step(closure)
    train(model_b, opt_b, 1)
    assert len(calls) == 1
    assert_same(model_a.parameters(), model_b.parameters())
