"""The MSAM paper's analyses (§5-6) on a short digits training: for each optimizer, the cosine
similarity between the momentum and the next gradient during training, the loss along the
momentum, the gradient and a random direction at the end (sharpness), and the feature rank of
the penultimate layer. Writes three PNG plots and analysis.json::

    python bench/analyze.py --optimizers sgd,sam,msam --epochs 10 --out bench/results/analysis
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import bench/ as a package of the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import provenance  # noqa: E402
from bench.data import load_digits_data  # noqa: E402
from bench.models import digits_cnn  # noqa: E402
from msam_fused import analysis, variants  # noqa: E402

DIRECTIONS = ("momentum", "gradient", "random")


def digits(device: torch.device, seed: int) -> tuple:
    """The training benchmark's digits data ((x, y) for train and test) and its CNN builder."""
    data = load_digits_data(device, seed)
    return ((data.train_x, data.train_y), (data.test_x, data.test_y)), digits_cnn


def analyze(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    ((xtr, ytr), (xte, yte)), digits_cnn = digits(device, args.seed)
    xtr, ytr = xtr[:args.train_samples], ytr[:args.train_samples]
    model = digits_cnn().to(device)
    rho = args.msam_rho if name in ("msam", "adamw-msam") else args.sam_rho
    opt = variants.build(name, model, lr=args.lr, weight_decay=args.wd, seed=args.seed,
                         **({"rho": rho} if name in variants.PERTURBING else {}))
    cosine = analysis.MomentumGradientCosine(opt)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for _ in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen).to(device)
        for i in range(0, len(xtr) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            losses.append(float(variants.train_step(model, opt, xtr[idx], ytr[idx])))
    cosine.remove()

    params = [p for p in model.parameters()]
    probe_x, probe_y = xtr[:args.probe_samples], ytr[:args.probe_samples]
    model.eval()
    with opt.unperturbed() if hasattr(opt, "unperturbed") else nullcontext():  # the true weights
        def probe_loss():
            return F.cross_entropy(model(probe_x), probe_y)

        directions = {"momentum": analysis.momentum_direction(opt, params),
                      "gradient": analysis.gradient_direction(params, probe_loss),
                      "random": analysis.random_direction(params, args.seed)}
        radii = torch.linspace(-args.radius, args.radius, args.points).tolist()
        along = {k: analysis.loss_along(params, d, radii, probe_loss) for k, d in directions.items()}
        with torch.no_grad():
            accuracy = float((model(xte).argmax(1) == yte).float().mean())
        features = analysis.penultimate_features(model, xtr)
    model.train()
    ratio = analysis.explained_variance_ratio(features)
    return {"test_accuracy": accuracy, "train_loss": losses, "cosine": cosine.history(),
            "radii": radii, "loss_along": along,
            "feature_rank": analysis.feature_rank(features, args.threshold),
            "feature_dims": features.shape[1],
            "explained_variance": torch.cumsum(ratio, 0).tolist()}


def plot_cosine(runs: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        values = torch.tensor(run["cosine"])
        steps = range(2, len(values) + 2)
        line, = ax.plot(steps, values, lw=0.6, alpha=0.35)
        window = max(1, len(values) // 10)  # a running mean makes the trend readable
        smooth = torch.cumsum(torch.cat([torch.zeros(1), values]), 0)
        smooth = (smooth[window:] - smooth[:-window]) / window
        ax.plot(steps[window - 1:], smooth, color=line.get_color(), lw=1.5, label=name)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="step", ylabel="cos(momentum, next gradient)",
           title="Momentum vs the next gradient")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sharpness(runs: dict, path: str) -> None:
    fig, axes = plt.subplots(1, len(DIRECTIONS), figsize=(4 * len(DIRECTIONS), 3.6))  # own scales
    for ax, direction in zip(axes, DIRECTIONS):
        for name, run in runs.items():
            ax.plot(run["radii"], run["loss_along"][direction], label=name)
        ax.set(xlabel=f"r (step along the unit {direction} direction)", title=direction)
    axes[0].set_ylabel("training loss at w + r d")
    axes[0].legend()
    fig.suptitle("Loss along directions at the end of training (MSAM perturbs at r = -rho "
                 "along the momentum)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_feature_rank(runs: dict, threshold: float, path: str) -> None:
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(runs)
    ranks = [runs[n]["feature_rank"] for n in names]
    bars.bar(names, ranks, color="tab:blue")
    for i, r in enumerate(ranks):
        bars.text(i, r, str(r), ha="center", va="bottom")
    bars.set_ylim(0, 1.15 * max(ranks + [1]))
    bars.set(ylabel=f"components for {100 * threshold:g}% of the variance",
             title="Feature rank (penultimate layer)")
    for name in names:
        cumulative = runs[name]["explained_variance"]
        curves.plot(range(1, len(cumulative) + 1), cumulative, label=name)
    curves.axhline(threshold, color="gray", lw=0.5)
    curves.set(xlabel="principal components", ylabel="explained variance", xscale="log")
    curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="sgd,sam,msam",
                        help=f"comma-separated, from {', '.join(variants.OPTIMIZERS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--sam-rho", type=float, default=0.05)
    parser.add_argument("--msam-rho", type=float, default=0.3)
    parser.add_argument("--radius", type=float, default=1.0, help="largest |r| of the loss-along-direction plot")
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--probe-samples", type=int, default=512, help="training images the loss is measured on")
    parser.add_argument("--threshold", type=float, default=0.99, help="variance fraction of the feature rank")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(provenance.RUNS / "analysis"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    runs = {name: analyze(name, args, device) for name in args.optimizers.split(",")}
    os.makedirs(args.out, exist_ok=True)
    plot_cosine(runs, os.path.join(args.out, "momentum_gradient_cosine.png"))
    plot_sharpness(runs, os.path.join(args.out, "sharpness.png"))
    plot_feature_rank(runs, args.threshold, os.path.join(args.out, "feature_rank.png"))
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump({"config": vars(args), "runs": runs}, f, indent=1)
    print(f"{'optimizer':<12} {'test acc':>9} {'feature rank':>13} {'mean cos':>9}")
    for name, run in runs.items():
        mean_cos = sum(run["cosine"]) / max(len(run["cosine"]), 1)
        print(f"{name:<12} {100 * run['test_accuracy']:>8.2f}% {run['feature_rank']:>13} {mean_cos:>9.3f}")
    print(f"plots and analysis.json in {args.out}")
    return runs


if __name__ == "__main__":
    main()
