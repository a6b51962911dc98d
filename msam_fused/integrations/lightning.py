"""Lightning: validation and checkpoints on the true weights of MSAM and AdamW-MSAM.

    trainer = lightning.Trainer(callbacks=[TrueWeightsCallback()], ...)

Between optimizer steps MSAM's parameters hold the perturbed weights (docs/design.md). With
this callback, during ``fit``:

* validation runs on the true weights (the perturbed ones come back afterwards, bit for bit);
* every checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``) stores the true weights as
  its ``state_dict`` and the optimizer state as it is, so the file is the model to ship and
  ``fit(ckpt_path=...)`` resumes the run (the optimizer re-applies its perturbation at the next
  step);
* when ``fit`` ends (or is interrupted), the true weights stay in the model, so ``test``,
  ``predict``, ``validate`` and ``torch.save(model.state_dict())`` afterwards see the trained model.

Automatic and manual optimization, gradient clipping, accumulation and mixed precision need
nothing more. SAM needs no callback (its parameters hold the true weights between steps); under
automatic optimization Lightning calls ``SAM.step(closure)``, which runs both passes.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from msam_fused.integrations.weights import TrueWeightsSwitch


class TrueWeightsCallback(Callback):
    """Validation, checkpoints and the model after ``fit`` on the true weights (see the module)."""

    def __init__(self) -> None:
        self._switch = TrueWeightsSwitch()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed fit starts from the checkpoint's true weights; so does a new one.
        self._switch = TrueWeightsSwitch()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._switch.stepped(trainer.optimizers)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch.show_true()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch.show_perturbed()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._switch.optimizers:
            with self._switch.true():
                # copies: the tensors of a state dict are the parameters, which go back to the
                # perturbed weights on leaving the context
                checkpoint["state_dict"] = {k: v.detach().clone() for k, v in
                                            trainer.strategy.lightning_module_state_dict().items()}
        # after fit (trainer.save_checkpoint): the state that belongs with the true weights held
        for i, optimizer in enumerate(trainer.optimizers if "optimizer_states" in checkpoint else ()):
            final = self._switch.final_state_dict(optimizer)
            if final is not None:
                checkpoint["optimizer_states"][i] = final

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch.finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._switch.finish()
