"""msam_fused.integrations.huggingface with the real HF Trainer and a tiny BERT built from a config.

Full-batch training (one step per epoch), so evaluation and checkpoints land on known steps.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install msam-fused[hf])")
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install msam-fused[hf])")
from safetensors.torch import load_file  # noqa: E402

import msam_fused  # noqa: E402
from msam_fused.integrations import true_weights, unwrap_optimizer  # noqa: E402
from msam_fused.integrations.huggingface import TrueWeightsCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

OPTIMIZERS = {
    "msam": (msam_fused.MSAM, dict(lr=0.2, momentum=0.9, weight_decay=1e-3, rho=2.0)),
    "adamw_msam": (msam_fused.AdamWMSAM, dict(lr=0.02, weight_decay=0.1, rho=0.5)),
}


def examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    labels = (ids[:, 0] > 20).long()
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": l}
            for i, l in zip(ids, labels)]


TRAIN, EVAL = examples(16, 0), examples(16, 1)


def tiny_bert(seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class RecordAtSaves(transformers.TrainerCallback):
    """Listed before ours: when the Trainer is about to evaluate and save, records what
    ``opt.unperturbed()`` gives (weights and eval loss); records the eval losses reported."""

    def __init__(self):
        self.true_states, self.perturbed_states, self.expected_losses, self.reported_losses = {}, {}, {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if control.should_save:
            opt = unwrap_optimizer(optimizer)
            self.true_states[state.global_step] = opt.unperturbed_state_dict(model)
            self.perturbed_states[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}
            batch = transformers.default_data_collator(EVAL)
            model.eval()
            with opt.unperturbed(), torch.no_grad():
                self.expected_losses[state.global_step] = model(**batch).loss.item()
            model.train()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.reported_losses[state.global_step] = metrics["eval_loss"]


def trainer(tmp_path, model, name, max_steps, callbacks=(), **arguments):
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path), "max_steps": max_steps, "per_device_train_batch_size": len(TRAIN),
        "per_device_eval_batch_size": len(EVAL), "eval_strategy": "steps", "eval_steps": 3,
        "save_strategy": "steps", "save_steps": 3, "lr_scheduler_type": "cosine", "report_to": "none",
        "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no", "seed": 0, **arguments})
    return transformers.Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL,
                                callbacks=[*callbacks, TrueWeightsCallback()],
                                optimizer_cls_and_kwargs=OPTIMIZERS[name])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_evaluation_checkpoints_and_final_model_hold_true_weights(tmp_path, name):
    model = tiny_bert(0)
    record = RecordAtSaves()
    hf = trainer(tmp_path, model, name, 6, [record])
    hf.train()

    assert type(hf.optimizer).__name__ == "AcceleratedOptimizer"
    assert sorted(record.true_states) == [3, 6]
    true, perturbed = record.true_states[3], record.perturbed_states[3]
    assert max((true[k] - perturbed[k]).abs().max() for k in true) > 1e-3, \
        "the perturbation is too small for this test to tell true from perturbed weights"
    for step, true_state in record.true_states.items():
        saved = load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
        assert saved.keys() <= true_state.keys()
        torch.testing.assert_close(saved, {k: true_state[k] for k in saved})
        assert record.reported_losses[step] == pytest.approx(record.expected_losses[step], rel=1e-6)
    # after train() the model is the trained one: evaluate() sees the true weights as they are
    torch.testing.assert_close(model.state_dict(), record.true_states[6])
    assert hf.evaluate()["eval_loss"] == pytest.approx(record.expected_losses[6], rel=1e-6)
    with true_weights(hf.optimizer):  # nothing left to remove after train(): a no-op, not a second removal
        pass


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_checkpoint_continues_the_run(tmp_path, name):
    # model.safetensors holds the true weights, optimizer.pt the optimizer state; on resume the
    # optimizer finds the true weights at its next step and re-applies its perturbation w - c*x,
    # which rounds: equal up to that rounding (fp32), not bit for bit.
    straight = tiny_bert(0)
    trainer(tmp_path / "straight", straight, name, 6).train()
    resumed = tiny_bert(1)  # other initial weights: all must come from the checkpoint
    trainer(tmp_path / "resumed", resumed, name, 6).train(
        resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_keeps_the_best_checkpoints_true_weights(tmp_path):
    model = tiny_bert(0)
    hf = trainer(tmp_path, model, "msam", 6, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    hf.train()
    best = load_file(tmp_path / hf.state.best_model_checkpoint.split("/")[-1] / "model.safetensors")
    torch.testing.assert_close({k: v for k, v in model.state_dict().items() if k in best}, best)


def test_the_last_checkpoint_resumes_a_longer_run(tmp_path):
    # The last checkpoint is written on the true weights kept at the end of training, with the
    # optimizer state of that moment: a longer run resumed from it is the straight longer run
    # (up to the rounding of re-applying the perturbation, fp32).
    straight = tiny_bert(0)
    trainer(tmp_path / "straight", straight, "msam", 9, lr_scheduler_type="constant").train()
    first = tiny_bert(0)
    trainer(tmp_path / "first", first, "msam", 6, lr_scheduler_type="constant").train()
    resumed = tiny_bert(1)
    trainer(tmp_path / "resumed", resumed, "msam", 9, lr_scheduler_type="constant").train(
        resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-6"))
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=1e-5, atol=1e-6)
