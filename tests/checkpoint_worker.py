"""Run by test_checkpoint_resume.py in fresh processes: train, save, resume, write the result.

    python checkpoint_worker.py OPTIMIZERS START STOP OUT [CHECKPOINT_IN [WEIGHTS]]

for each optimizer in the comma-separated OPTIMIZERS, trains steps START..STOP-1 (loading
model and optimizer from CHECKPOINT_IN if given, into freshly built objects) and saves model,
optimizer and the unperturbed weights to OUT, keyed by optimizer name. WEIGHTS says which
saved weights the model is loaded with: "model" (as they were, the default) or "true".
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import msam_fused


def build(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    params = [{"params": model[0].parameters(), "lr": 0.05},
              {"params": [*model[1].parameters(), *model[4].parameters()]}]
    if name == "MSAM":
        opt = msam_fused.MSAM(params, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.5)
    elif name == "AdamWMSAM":
        opt = msam_fused.AdamWMSAM(params, lr=1e-2, weight_decay=0.05, rho=0.3)
    else:
        opt = msam_fused.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    return model, opt


def train_step(model, opt, step):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    F.cross_entropy(model(x), y).backward()
    if isinstance(opt, msam_fused.SAM):
        opt.first_step(zero_grad=True)
        with msam_fused.disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.param_groups[1]["rho"] = 0.5 if step < 6 else 0.2  # a rho schedule
        opt.step()
        opt.zero_grad()


def main(names, start, stop, out, checkpoint=None, weights="model"):
    saved = torch.load(checkpoint, weights_only=True) if checkpoint else {}
    result = {}
    for name in names.split(","):
        model, opt = build(name)
        if checkpoint:
            model.load_state_dict(saved[name][weights])
            opt.load_state_dict(saved[name]["optimizer"])
        for step in range(int(start), int(stop)):
            train_step(model, opt, step)
        true = opt.unperturbed_state_dict(model) if hasattr(opt, "unperturbed") else model.state_dict()
        result[name] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "true": true}
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
