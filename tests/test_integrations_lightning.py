"""msam_fused.integrations.lightning with the real Lightning Trainer, against plain loops.

A tiny MLP trains full-batch (one step per epoch, validation after each), so the Trainer takes
exactly the steps of the plain loop it is compared with: the same operations in the same order.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch", reason="needs lightning (pip install msam-fused[lightning])")

import msam_fused  # noqa: E402
from msam_fused.integrations.lightning import TrueWeightsCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

OPTIMIZERS = {
    "msam": functools.partial(msam_fused.MSAM, lr=0.2, momentum=0.9, weight_decay=1e-3, rho=2.0),
    "adamw_msam": functools.partial(msam_fused.AdamWMSAM, lr=0.02, weight_decay=0.1, rho=0.5),
}


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


TRAIN, VAL = data(), data(seed=1)


def net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


class Tiny(L.LightningModule):
    def __init__(self, make_optimizer, seed=0):
        super().__init__()
        self.net = net(seed)
        self.make_optimizer = make_optimizer
        self.val_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.val_losses.append(loss.detach().clone())
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class ManualTiny(Tiny):
    def __init__(self, make_optimizer, seed=0):
        super().__init__(make_optimizer, seed)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        opt.step()
        opt.zero_grad()


def loader(xy, batch_size=None):
    dataset = torch.utils.data.TensorDataset(*xy)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or len(dataset), shuffle=False)


def trainer(tmp_path, epochs, callbacks=(), **kwargs):
    checkpoints = L.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1,
                                              every_n_epochs=1)
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[*callbacks, TrueWeightsCallback(), checkpoints],
                     default_root_dir=tmp_path, **kwargs)


def plain_loop(make_optimizer, epochs, batch_size=None, accumulate=1, clip=None, bf16=False):
    """The reference: the same steps written out, evaluated under ``opt.unperturbed()``."""
    model = net(0)
    opt = make_optimizer(model.parameters())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    val_losses, true_states, perturbed_states = [], [], []
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader(TRAIN, batch_size)):
            with autocast:
                loss = F.cross_entropy(model(x), y) / accumulate
            loss.backward()
            if (i + 1) % accumulate == 0:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
        with opt.unperturbed(), torch.no_grad(), autocast:
            val_losses.append(F.cross_entropy(model(VAL[0]), VAL[1]))
        true_states.append(opt.unperturbed_state_dict(model))
        perturbed_states.append({k: v.clone() for k, v in model.state_dict().items()})
    return val_losses, true_states, perturbed_states


def module_weights(state_dict):
    return {k.removeprefix("net."): v for k, v in state_dict.items()}


@pytest.mark.parametrize("name, module", [("msam", Tiny), ("adamw_msam", Tiny), ("msam", ManualTiny)])
def test_validation_checkpoints_and_final_model_hold_true_weights(tmp_path, name, module):
    epochs = 3
    model = module(OPTIMIZERS[name])
    fit = trainer(tmp_path, epochs)
    fit.fit(model, loader(TRAIN), loader(VAL))
    val_losses, true_states, perturbed_states = plain_loop(OPTIMIZERS[name], epochs)

    assert max((true_states[-1][k] - perturbed_states[-1][k]).abs().max() for k in true_states[-1]) > 1e-3, \
        "the perturbation is too small for this test to tell true from perturbed weights"
    torch.testing.assert_close(torch.stack(model.val_losses), torch.stack(val_losses))
    for epoch in range(epochs):
        saved = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=False)
        torch.testing.assert_close(module_weights(saved["state_dict"]), true_states[epoch])
    torch.testing.assert_close(model.net.state_dict(), true_states[-1])
    # after fit the model is the trained one: validate() sees the true weights as they are
    fit.validate(model, loader(VAL), verbose=False)
    torch.testing.assert_close(model.val_losses[-1], val_losses[-1])


class ClippedInTheHook(Tiny):
    """Lightning refuses ``gradient_clip_val`` under mixed precision for optimizers that unscale
    inside ``step()`` (ours, torch's fused ones); the module's hook clips instead."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.5)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_accumulation_and_clipping(tmp_path, precision):
    make = OPTIMIZERS["msam"]
    bf16 = precision == "bf16-mixed"
    model = ClippedInTheHook(make) if bf16 else Tiny(make)
    fit = trainer(tmp_path, 2, precision=precision, accumulate_grad_batches=2,
                  gradient_clip_val=None if bf16 else 0.5)
    fit.fit(model, loader(TRAIN, batch_size=8), loader(VAL))
    val_losses, true_states, _ = plain_loop(make, 2, batch_size=8, accumulate=2, clip=0.5, bf16=bf16)

    assert fit.global_step == 4
    torch.testing.assert_close(torch.stack(model.val_losses), torch.stack(val_losses))
    torch.testing.assert_close(model.net.state_dict(), true_states[-1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_a_true_weights_checkpoint_continues_the_run(tmp_path, name):
    # The checkpoint holds the true weights and the optimizer state; on resume the optimizer
    # finds the true weights at its next step and re-applies its perturbation w - c*x, which
    # rounds: equal up to that rounding (fp32), not bit for bit.
    straight = Tiny(OPTIMIZERS[name])
    trainer(tmp_path / "straight", 4).fit(straight, loader(TRAIN), loader(VAL))
    resumed = Tiny(OPTIMIZERS[name], seed=1)  # other initial weights: all must come from the file
    trainer(tmp_path / "resumed", 4).fit(resumed, loader(TRAIN), loader(VAL),
                                         ckpt_path=tmp_path / "straight" / "epoch=1.ckpt")
    torch.testing.assert_close(resumed.net.state_dict(), straight.net.state_dict(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(resumed.val_losses), torch.stack(straight.val_losses[2:]),
                               rtol=1e-5, atol=1e-6)


def test_a_checkpoint_saved_after_fit_resumes_a_longer_run(tmp_path):
    # After fit the model holds the true weights; trainer.save_checkpoint() then stores them
    # with the optimizer state of the end of training, so a longer run resumes from it.
    make = OPTIMIZERS["msam"]
    straight = Tiny(make)
    trainer(tmp_path / "straight", 4).fit(straight, loader(TRAIN), loader(VAL))
    first = Tiny(make)
    fit = trainer(tmp_path / "first", 2)
    fit.fit(first, loader(TRAIN), loader(VAL))
    fit.save_checkpoint(tmp_path / "after-fit.ckpt")
    saved = torch.load(tmp_path / "after-fit.ckpt", weights_only=False)
    torch.testing.assert_close(module_weights(saved["state_dict"]), first.net.state_dict(), rtol=0, atol=0)
    resumed = Tiny(make, seed=1)
    trainer(tmp_path / "resumed", 4).fit(resumed, loader(TRAIN), loader(VAL), ckpt_path=tmp_path / "after-fit.ckpt")
    torch.testing.assert_close(resumed.net.state_dict(), straight.net.state_dict(), rtol=1e-5, atol=1e-6)


def test_sam_under_automatic_optimization_runs_both_passes(tmp_path):
    # Lightning calls SAM.step(closure) with a closure that runs forward and backward: SAM runs
    # it for the gradient at w, ascends, and runs it again at w + e.
    make = functools.partial(msam_fused.SAM, base_optimizer=torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    model = Tiny(make)
    trainer(tmp_path, 3).fit(model, loader(TRAIN), loader(VAL))

    reference = net(0)
    sam = make(reference.parameters())
    x, y = TRAIN
    for _ in range(3):
        F.cross_entropy(reference(x), y).backward()
        sam.first_step(zero_grad=True)
        F.cross_entropy(reference(x), y).backward()
        sam.second_step(zero_grad=True)
    torch.testing.assert_close(model.net.state_dict(), reference.state_dict())


class FailsAtEpoch(Tiny):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("stop here")
        return super().training_step(batch, batch_idx)


def test_an_interrupted_fit_leaves_the_true_weights(tmp_path):
    model = FailsAtEpoch(OPTIMIZERS["msam"])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer(tmp_path, 4).fit(model, loader(TRAIN), loader(VAL))
    _, true_states, _ = plain_loop(OPTIMIZERS["msam"], 2)
    torch.testing.assert_close(model.net.state_dict(), true_states[-1])
