"""build() makes every optimizer by name, and train_step() trains with each of them."""

import pytest
import torch

import msam_fused
from msam_fused import variants
from test_optimizer_api import batch, small_model

CASES = [("sgd", {}, torch.optim.SGD), ("adamw", {}, torch.optim.AdamW),
         ("msam", {}, msam_fused.MSAM), ("msam", {"perturb": "norm", "adaptive": "weights"}, msam_fused.MSAM),
         ("adamw-msam", {"adaptive": "all"}, msam_fused.AdamWMSAM), ("sam", {}, msam_fused.SAM),
         ("sam", {"ascent_steps": 2}, variants.MultiStepSAM),
         ("sam", {"ascent_norm": "linf", "base": "adamw"}, variants.MultiStepSAM),
         ("looksam", {"looksam_k": 2}, variants.LookSAM), ("esam", {"seed": 0}, variants.ESAM),
         ("mesa", {"mesa_start_step": 1}, variants.MESA)]


@pytest.mark.parametrize("name,options,cls", CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o, _ in CASES])
def test_every_optimizer_builds_and_trains(name, options, cls):
    model = small_model()
    opt = variants.build(name, model, lr=0.05, weight_decay=1e-4, backend="reference", **options)
    assert type(opt) is cls
    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(variants.train_step(model, opt, *batch(step))) for step in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_options_reach_the_optimizer():
    model = small_model()
    opt = variants.build("msam", model, lr=0.1, rho=2.0, perturb="norm", backend="reference")
    assert {(g["perturb"], g["rho"]) for g in opt.param_groups} == {(True, 2.0), (False, 2.0)}
    sign = variants.build("sam", model, lr=0.1, ascent_steps=3, ascent_norm="linf")
    assert (sign.steps, sign.norm, sign.param_groups[0]["rho"]) == (3, "linf", 0.05)
    look = variants.build("looksam", model, lr=0.1, looksam_k=7, looksam_alpha=0.3)
    assert (look.k, look.alpha) == (7, 0.3)
    mesa = variants.build("mesa", model, lr=0.1, mesa_decay=0.99, mesa_temperature=2.0)
    assert (mesa.decay, mesa.temperature) == (0.99, 2.0)


def test_misuse_gets_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        variants.build("lion", model, lr=0.1)
    with pytest.raises(ValueError, match="sgd does not perturb the weights"):
        variants.build("sgd", model, lr=0.1, adaptive="all")
    with pytest.raises(ValueError, match="apply to 'sam' only"):
        variants.build("msam", model, lr=0.1, ascent_steps=2)
    with pytest.raises(ValueError, match="unknown base optimizer"):
        variants.build("sam", model, lr=0.1, base="lamb")


@pytest.mark.gpu
@pytest.mark.parametrize("name,options,cls", CASES,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o, _ in CASES])
def test_every_optimizer_trains_on_cuda_like_on_the_cpu(name, options, cls):
    results = []
    for device in ("cpu", "cuda"):
        model = small_model(dtype=torch.float64).to(device)
        opt = variants.build(name, model, lr=0.05, weight_decay=1e-4, backend="reference", **options)
        for step in range(3):
            x, y = batch(step, torch.float64)
            variants.train_step(model, opt, x.to(device), y.to(device))
        results.append([p.detach().cpu() for p in model.parameters()])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-11)
