"""Hugging Face ``Trainer``: evaluation, checkpoints and the trained model on the true weights.

    trainer = transformers.Trainer(model, args, ..., callbacks=[TrueWeightsCallback()],
                                   optimizer_cls_and_kwargs=(msam_fused.MSAM, {"lr": 0.1, "rho": 1.0}))

Between optimizer steps MSAM's parameters hold the perturbed weights (docs/design.md). With
this callback, during ``train()``:

* every evaluation and every checkpoint the Trainer makes runs on the true weights, so
  ``model.safetensors`` holds the model to ship; ``optimizer.pt`` holds the optimizer state as it
  is, and ``train(resume_from_checkpoint=...)`` resumes the run (the optimizer re-applies its
  perturbation at the next step);
* when training ends, the true weights stay in the model (or the best checkpoint's, with
  ``load_best_model_at_end``), so ``evaluate()``, ``predict()`` and ``save_model()`` afterwards
  see the trained model.

The Trainer wraps the optimizer in accelerate's ``AcceleratedOptimizer``; the callback (and
:func:`msam_fused.integrations.true_weights`) find ours inside it.

How: the Trainer evaluates and saves right after ``on_step_end`` / ``on_epoch_end`` when its
control flags say so; the callback runs after the Trainer's own flow callback has set them,
shows the true weights then, and puts the perturbed ones back at the next ``on_step_begin``.
"""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from msam_fused.integrations.weights import TrueWeightsSwitch


class TrueWeightsCallback(TrainerCallback):
    """Evaluation, checkpoints and the model after ``train()`` on the true weights (see the module)."""

    def __init__(self) -> None:
        self._switch = TrueWeightsSwitch()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A resumed run starts from the checkpoint's true weights; so does a new one.
        self._switch = TrueWeightsSwitch()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer=None, **kwargs):
        self._switch.stepped([optimizer])

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._switch.show_perturbed()

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._switch.show_perturbed()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._before_evaluate_or_save(control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._before_evaluate_or_save(control)

    def _before_evaluate_or_save(self, control: TrainerControl) -> None:
        # the last step: what follows (evaluation, the last checkpoint) sees the true weights
        if control.should_evaluate or control.should_save or control.should_training_stop:
            self._switch.show_true()
        else:
            self._switch.show_perturbed()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._switch.finish(replaced=args.load_best_model_at_end and state.best_model_checkpoint is not None)
