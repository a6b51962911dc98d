"""msam_fused.integrations.weights: finding our optimizers behind wrappers, true_weights(), and
the switch the trainer callbacks use, in plain loops (no trainer library needed)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import msam_fused
from msam_fused.integrations import true_weights, unwrap_optimizer
from msam_fused.integrations.weights import TrueWeightsSwitch


DATA = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2


def closure_for(model, opt):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(DATA[0]), DATA[1])
        loss.backward()
        return loss
    return closure


def trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = msam_fused.MSAM(model.parameters(), lr=0.3, rho=2.0)
    closure = closure_for(model, opt)
    for _ in range(steps):
        opt.step(closure)
    return model, opt, closure


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unwrap_finds_ours_inside_trainer_wrappers():
    _, opt, _ = trained()
    assert unwrap_optimizer(opt) is opt
    sam = msam_fused.SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    assert unwrap_optimizer(sam) is sam  # SAM's base optimizer is not where its parameters live
    # accelerate's AcceleratedOptimizer: through the HF Trainer, tests/test_integrations_huggingface.py
    lightning = pytest.importorskip("lightning.pytorch", reason="needs lightning for LightningOptimizer")
    assert unwrap_optimizer(lightning.core.optimizer.LightningOptimizer(opt)) is opt


def test_true_weights_of_ours_and_nothing_for_others():
    model, opt, _ = trained()
    other = torch.nn.Linear(3, 3)
    sgd = torch.optim.SGD(other.parameters(), lr=0.1)
    sam = msam_fused.SAM(other.parameters(), torch.optim.SGD, lr=0.1)
    perturbed, others, true = weights(model), weights(other), opt.unperturbed_state_dict(model)
    with true_weights(sgd, opt, sam):
        torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
        torch.testing.assert_close(weights(other), others, rtol=0, atol=0)
    torch.testing.assert_close(weights(model), perturbed, rtol=0, atol=0)


def test_the_switch_shows_true_weights_for_a_while_and_keeps_them_at_the_end():
    model, opt, _ = trained()
    perturbed, true = weights(model), opt.unperturbed_state_dict(model)
    switch = TrueWeightsSwitch()
    switch.show_true()  # nothing stepped in this run yet: nothing to do
    torch.testing.assert_close(weights(model), perturbed, rtol=0, atol=0)
    switch.stepped([torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0), opt])
    assert switch.optimizers == [opt]
    for _ in range(2):  # idempotent both ways
        switch.show_true()
        torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
    with switch.true():  # already shown: stays shown after
        pass
    torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
    switch.show_perturbed()
    with switch.true():
        torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
    torch.testing.assert_close(weights(model), perturbed, rtol=0, atol=0)
    state = opt.state_dict()
    switch.finish()
    torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
    assert switch.optimizers == []
    switch.finish()  # once only: the true weights are not moved again
    torch.testing.assert_close(weights(model), true, rtol=0, atol=0)
    # the state that goes with them is the one of the end of training
    final = switch.final_state_dict(opt)
    torch.testing.assert_close(final["state"], state["state"], rtol=0, atol=0)


def test_finishing_keeps_what_the_trainer_put_in_the_parameters():
    model, opt, _ = trained()
    switch = TrueWeightsSwitch()
    switch.stepped([opt])
    switch.show_true()
    best = {k: torch.full_like(v, 0.5) for k, v in weights(model).items()}  # a best checkpoint loaded
    model.load_state_dict(best)
    switch.finish(replaced=True)
    torch.testing.assert_close(weights(model), best, rtol=0, atol=0)
    assert switch.final_state_dict(opt) is None


def test_an_optimizer_stepped_after_finish_continues_the_run():
    # finish() leaves the true weights; the next step puts the perturbation back first,
    # which rounds: equal to the uninterrupted run up to that rounding (fp32).
    model, opt, closure = trained()
    twin_model = copy.deepcopy(model)
    twin_opt = msam_fused.MSAM(twin_model.parameters(), lr=0.3, rho=2.0)
    twin_opt.load_state_dict(opt.state_dict())
    twin_closure = closure_for(twin_model, twin_opt)
    switch = TrueWeightsSwitch()
    switch.stepped([opt])
    switch.finish()
    for _ in range(3):
        opt.step(closure)
        twin_opt.step(twin_closure)
    torch.testing.assert_close(opt.unperturbed_state_dict(model), twin_opt.unperturbed_state_dict(twin_model),
                               rtol=1e-5, atol=1e-6)
    assert switch.final_state_dict(opt) is None  # stepped since: no longer the state of those weights
