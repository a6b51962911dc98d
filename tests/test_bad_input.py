"""Bad input gets a clear error naming the problem and changes nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msam_fused
from test_optimizer_api import OPTIMIZERS, assert_unchanged, batch, small_model, snapshot, train


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), "invalid lr=-0.1: must be >= 0"),
    (dict(rho=-1.0), "invalid rho=-1.0"),
    (dict(weight_decay=-1e-4), "invalid weight_decay"),
    (dict(momentum=1.0), "invalid momentum=1.0: must be < 1.0"),
    (dict(momentum=-0.5), "invalid momentum"),
    (dict(nesterov=True), "nesterov=True is not part of MSAM"),
    (dict(dampening=0.1), "dampening=0.1 is not part of MSAM"),
    (dict(lr=torch.tensor([0.1])), "lr must be a Python float or a 0-d floating-point tensor"),
    (dict(lr=torch.tensor(1)), "lr must be a Python float or a 0-d floating-point tensor"),
    (dict(rho=float("nan")), "must be finite"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
])
def test_msam_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        msam_fused.MSAM(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(betas=(1.0, 0.999)), r"invalid betas\[0\]=1.0"),
    (dict(betas=(0.9, -0.1)), r"invalid betas\[1\]"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=-1e-8), "invalid eps"),
    (dict(amsgrad=True), "amsgrad=True is not supported"),
    (dict(rho=-0.5), "invalid rho"),
])
def test_adamw_msam_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        msam_fused.AdamWMSAM(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_hyperparameter_set_between_steps_fails_the_step_and_changes_nothing(name):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 2)
    opt.param_groups[0]["rho"] = -2.0
    x, y = batch(5)
    F.cross_entropy(model(x), y).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="param group 0: invalid rho=-2.0"):
        opt.step()
    assert_unchanged(model, opt, snap)


def test_parameter_lists_empty_duplicated_complex():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="empty parameter list"):
        msam_fused.MSAM([])
    with pytest.raises(ValueError, match="listed more than once"):
        msam_fused.MSAM([p, p])
    with pytest.raises(ValueError, match="listed more than once"):
        msam_fused.MSAM([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="complex"):
        msam_fused.AdamWMSAM([nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="only floating-point"):
        msam_fused.MSAM([torch.zeros(3, dtype=torch.int64)])
    opt = msam_fused.MSAM([p])
    with pytest.raises(ValueError, match="listed more than once"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_gradient_is_rejected_before_anything_changes(name):
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)
    opt = OPTIMIZERS[name](list(lin.parameters()) + list(emb.parameters()))
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match="parameter 2 of param group 0 .*sparse gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip((*lin.parameters(), *emb.parameters()), before))
    assert not any(opt.state.values())


def _moved_parameter_fails_cleanly(name, move):
    model = small_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 2)
    snap = snapshot(model, opt)
    target = model[3].weight
    original = target.data
    target.data = move(original)
    target.grad = None
    with pytest.raises(RuntimeError, match="parameter 4 of param group 0 .*was cpu/torch.float32 "
                                           "when the optimizer was built and is now"):
        opt.step()
    target.data = original
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameter_cast_after_the_optimizer_was_built(name):
    _moved_parameter_fails_cleanly(name, lambda t: t.double())


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameter_moved_to_gpu_after_the_optimizer_was_built(name):
    _moved_parameter_fails_cleanly(name, lambda t: t.cuda())


def test_state_dict_from_another_optimizer_or_model_is_rejected_untouched():
    model = small_model()
    opt = OPTIMIZERS["MSAM"](model.parameters())
    train(model, opt, 2)
    snap = snapshot(model, opt)
    adamw = OPTIMIZERS["AdamWMSAM"](small_model().parameters())
    train(small_model(), adamw, 0)
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    adam = torch.optim.Adam(model.parameters())
    other_model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    other = OPTIMIZERS["MSAM"](other_model.parameters())
    x = torch.randn(8, 3)
    F.cross_entropy(other_model(x), torch.zeros(8, dtype=torch.long)).backward()
    other.step()
    cases = [
        (adamw.state_dict(), "saved by AdamWMSAM, not MSAM"),
        (nesterov.state_dict(), "nesterov=True is not part of MSAM"),
        (adam.state_dict(), "has no \\['momentum'\\].*nor by torch.optim.SGD"),
        (other.state_dict(), "shape \\(16, 3\\), expected \\(16, 6\\): another model"),
        ({"state": {}, "param_groups": []}, "0 param groups, this optimizer has 1"),
        ({"weights": 1}, "not an optimizer state dict"),
    ]
    for state_dict, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(state_dict)
        assert_unchanged(model, opt, snap)
    sd = opt.state_dict()
    sd["msam_fused"]["master_weights"] = True
    with pytest.raises(ValueError, match="master_weights=True"):
        opt.load_state_dict(sd)
    assert_unchanged(model, opt, snap)
