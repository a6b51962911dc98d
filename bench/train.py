"""Train a model with SGD, SAM or MSAM and report test accuracy and images/s.

The embedded default needs no download: scikit-learn's bundled digits (1797 8x8 images)::

    python bench/train.py --data digits --compare sgd,sam,msam
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import msam_fused


def digits_data(device, seed=0):
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split].to(device), y[:split].to(device)), (x[split:].to(device), y[split:].to(device))


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def make_optimizer(name, params, args):
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.wd)
    if name == "sam":
        return msam_fused.SAM(params, torch.optim.SGD, rho=args.sam_rho, lr=args.lr, momentum=0.9,
                              weight_decay=args.wd, backend=args.backend)
    if name == "msam":
        return msam_fused.MSAM(params, lr=args.lr, momentum=0.9, weight_decay=args.wd,
                               rho=args.msam_rho, backend=args.backend)
    raise SystemExit(f"unknown optimizer {name!r}; choose sgd, sam or msam")


def train_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, msam_fused.SAM):
        opt.first_step(zero_grad=True)
        with msam_fused.disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    else:
        opt.step()
        opt.zero_grad()
    return loss


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def run(name, args, device):
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = digits_data(device, args.seed)
    model = digits_cnn().to(device)
    opt = make_optimizer(name, model.parameters(), args)
    gen = torch.Generator().manual_seed(args.seed)
    seen, busy = 0, 0.0
    for _ in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen).to(device)
        start = time.perf_counter()
        for i in range(0, len(xtr) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            train_step(model, opt, xtr[idx], ytr[idx])
            seen += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - start
    if isinstance(opt, msam_fused.MSAM):
        with opt.unperturbed():
            acc = accuracy(model, xte, yte)
    else:
        acc = accuracy(model, xte, yte)
    return acc, seen / busy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits"])
    parser.add_argument("--compare", default="sgd,sam,msam", help="comma-separated optimizers")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--sam-rho", type=float, default=0.05)
    parser.add_argument("--msam-rho", type=float, default=0.3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {name: run(name, args, device) for name in args.compare.split(",")}
    base = results.get("sgd", next(iter(results.values())))[1]
    print(f"{'optimizer':<10} {'test acc':>9} {'images/s':>10} {'vs SGD':>7}")
    for name, (acc, ips) in results.items():
        print(f"{name:<10} {100 * acc:>8.2f}% {ips:>10.0f} {ips / base:>7.2f}")


if __name__ == "__main__":
    main()
