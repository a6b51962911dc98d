"""Train a model with SGD, NAG, AdamW, SAM, MSAM or AdamW-MSAM; report test accuracy and images/s.

The embedded default needs no download (scikit-learn's bundled 8x8 digits)::

    python bench/train.py --data digits --compare sgd,sam,msam

The paper's recipes by name, any flag overriding the preset::

    python bench/train.py --preset cifar100-wrn28-10 --data-dir ~/data --optimizer msam --out-dir runs/wrn
    python bench/train.py --preset imagenet-vit-s32 --data-dir /data/imagenet --amp bf16 --out-dir runs/vit

Data-parallel (DDP), one process per GPU, on one node or several::

    torchrun --nproc-per-node 8 bench/train.py --preset cifar100-wrn28-10 --data-dir D --sync-bn
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 bench/train.py --preset imagenet-resnet50 --data-dir D

With ``--out-dir`` every run writes ``log.json`` (one record per epoch), ``curves.png`` and
an atomic ``checkpoint.pt``; ``--resume`` continues a killed run exactly where the last
checkpoint left it. MSAM is evaluated on its unperturbed weights. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: import bench/ as a package of the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import nn

import msam_fused
from msam_fused import rho_schedulers
from bench import checkpoint, ddp
from bench.data import DATASETS, DataError, load_data
from bench.models import ImageShape, build_model, check_model_name, natural_shape
from bench.optimizers import (ASCENTS, OPTIMIZERS, TORCH_IMPLS, VARIANT_STEP_TYPES, Hyper, StepConfig,
                              base_of, build_optimizer, optimizer_backend, overlap_backward, train_step)

CHECKPOINT_FORMAT = 1

# The paper's recipes (arXiv 2401.12033, its experimental setup). Values marked "ours" are not given by the paper; tune them.
PRESETS = {
    "cifar100-wrn28-10": dict(model="wrn-28-10", data="cifar100", lr=0.5, weight_decay=5e-4,
                              batch_size=256, epochs=200, label_smoothing=0.1, msam_rho=3.0,
                              sam_rho=0.1),  # sam_rho: ours
    "cifar100-wrn16-4": dict(model="wrn-16-4", data="cifar100", lr=0.5, weight_decay=5e-4,
                             batch_size=256, epochs=200, label_smoothing=0.1, msam_rho=3.0,
                             sam_rho=0.1),  # sam_rho: ours
    "cifar100-resnet50": dict(model="resnet50-cifar", data="cifar100", lr=0.1, weight_decay=1e-3,
                              batch_size=256, epochs=200, label_smoothing=0.1,
                              msam_rho=1.0, sam_rho=0.1),  # rhos, batch, epochs: ours
    "imagenet-resnet50": dict(model="resnet50", data="imagenet", lr=0.4, weight_decay=1e-4,
                              batch_size=1024, epochs=100, label_smoothing=0.1, warmup_epochs=5,
                              msam_rho=1.0, sam_rho=0.05),  # lr (linear scaling), warm-up, rhos: ours
    "imagenet-vit-s32": dict(model="vit-s32", data="imagenet", optimizer="adamw-msam", lr=1e-3,
                             weight_decay=0.1, batch_size=1024, epochs=90, warmup_epochs=8,
                             rho_schedule="warmup_zero", rho_schedule_epochs=8, clip_grad=1.0,
                             label_smoothing=0.1,
                             msam_rho=1.0, sam_rho=0.05),  # epochs, rhos: ours
}
DEFAULTS = dict(model=None, data="digits", optimizer="msam", momentum=0.9,
                beta1=0.9, beta2=0.999, eps=1e-8, sam_rho=0.05, msam_rho=0.3,
                batch_size=64, epochs=12, schedule="cosine", warmup_epochs=0, rho_schedule="constant",
                rho_schedule_epochs=0,
                label_smoothing=0.0, clip_grad=0.0)
# The learning rate and weight decay of each family (bench.optimizers.base_of): an optimizer
# takes its family's unless --lr/--weight-decay are given; a preset's are those of its own
# optimizer's family. So `--compare sgd,adamw` trains each with a recipe that suits it.
RECIPE_FLAGS = ("lr", "weight_decay")
FAMILY_RECIPES = {"sgd": dict(lr=0.05, weight_decay=5e-4), "adamw": dict(lr=1e-3, weight_decay=0.05)}
# Flags that shape the trajectory: a resumed run must have the values it was saved with.
VARIANT_FLAGS = ("base", "perturb", "adaptive", "ascent_steps", "ascent_norm", "looksam_k",
                 "looksam_alpha", "esam_beta", "esam_gamma", "mesa_decay", "mesa_temperature",
                 "mesa_weight", "mesa_start_step")
TRAJECTORY_FLAGS = VARIANT_FLAGS + ("model", "data", "optimizer", "backend", "torch_impl", "lr", "momentum",
                    "weight_decay", "beta1", "beta2", "eps", "sam_rho", "msam_rho", "batch_size",
                    "epochs", "schedule", "warmup_epochs", "rho_schedule", "rho_schedule_epochs",
                    "label_smoothing",
                    "clip_grad", "amp", "seed", "image_size", "num_classes", "synthetic_steps",
                    "channels_last", "sync_bn", "sam_ascent")


class UsageError(ValueError):
    """A flag, data set or checkpoint that cannot work; the message says why."""


# ----------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to train")
    what.add_argument("--preset", choices=sorted(PRESETS), help="a paper recipe; flags override it")
    what.add_argument("--model", help="digits-cnn (digits default), wrn-28-10, wrn-16-4, wrn-D-K, "
                      "resnet18-cifar, resnet50-cifar (CIFAR default), resnet50, vit-s32")
    what.add_argument("--data", choices=DATASETS)
    what.add_argument("--data-dir", help="where cifar10/cifar100 (torchvision's format) or the "
                      "ImageNet ImageFolder tree (train/, val/) lives; nothing is downloaded")
    what.add_argument("--image-size", type=int, help="synthetic data and ImageNet crops")
    what.add_argument("--num-classes", type=int, help="synthetic data")
    what.add_argument("--synthetic-steps", type=int, default=50, help="steps per synthetic epoch")
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--optimizer", choices=OPTIMIZERS)
    opt.add_argument("--compare", help="comma-separated optimizers to train one after another "
                     "from the same initialisation, e.g. sgd,sam,msam")
    opt.add_argument("--backend", default="auto", choices=msam_fused.backends.BACKEND_NAMES,
                     help="msam_fused backend for SAM/MSAM")
    opt.add_argument("--torch-impl", default="fused", choices=TORCH_IMPLS,
                     help="torch.optim implementation for SGD/NAG/AdamW and SAM's base (default: "
                     "fused, torch's fastest on CPU and CUDA, as MSAM's kernels are ours)")
    opt.add_argument("--sam-ascent", default="local", choices=ASCENTS,
                     help="SAM under DDP: ascend on each rank's own gradient (local, no extra "
                     "all-reduce) or on the all-reduced one (global)")
    opt.add_argument("--lr", type=float, help="default: the optimizer family's (SGD-like 0.05, "
                     "AdamW-like 1e-3) or the preset's")
    opt.add_argument("--momentum", type=float)
    opt.add_argument("--weight-decay", "--wd", type=float, dest="weight_decay",
                     help="default: the family's (5e-4, 0.05) or the preset's")
    opt.add_argument("--beta1", type=float)
    opt.add_argument("--beta2", type=float)
    opt.add_argument("--eps", type=float)
    opt.add_argument("--sam-rho", type=float)
    opt.add_argument("--msam-rho", type=float)
    var = p.add_argument_group("variants (msam_fused.variants; docs/variants.md)")
    var.add_argument("--base", choices=("sgd", "adamw"), help="base of looksam, esam, mesa")
    var.add_argument("--perturb", choices=("all", "norm"),
                     help="norm: perturb only normalization layers (SAM-ON)")
    var.add_argument("--adaptive", choices=("off", "all", "weights"), help="ASAM-style |w| scaling")
    var.add_argument("--ascent-steps", type=int, help="SAM: k ascent steps of rho/k")
    var.add_argument("--ascent-norm", choices=("l2", "linf"), help="SAM: linf = sign (FGSM) ascent")
    for flag, kind in (("looksam-k", int), ("looksam-alpha", float), ("esam-beta", float),
                       ("esam-gamma", float), ("mesa-decay", float), ("mesa-temperature", float),
                       ("mesa-weight", float), ("mesa-start-step", int)):
        var.add_argument(f"--{flag}", type=kind)
    opt.add_argument("--schedule", choices=("cosine", "constant"))
    opt.add_argument("--warmup-epochs", type=float, help="linear LR warm-up")
    opt.add_argument("--rho-schedule", choices=sorted(rho_schedulers.SCHEDULES),
                     help="msam_fused.rho_schedulers, stepped every step: warmup_zero (rho = 0 for "
                     "--rho-schedule-epochs, the paper's ViT recipe), step (the same jump), linear "
                     "(ramp up over them), cosine (anneal over them), constant")
    opt.add_argument("--rho-schedule-epochs", type=float, help="the schedule's length in epochs")
    opt.add_argument("--label-smoothing", type=float)
    opt.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=int)
    run.add_argument("--batch-size", type=int, help="global batch (split over DDP processes)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                     help="bf16 autocast, or fp16 autocast with a GradScaler")
    run.add_argument("--channels-last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    run.add_argument("--workers", type=int, default=4, help="ImageFolder loader processes")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels (bit-identical reruns and resumes)")
    run.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default 1 "
                     "for digits, whose 8x8 images gain nothing from a second thread, else torch's)")
    out = p.add_argument_group("output and checkpoints")
    out.add_argument("--out-dir", help="log.json, curves.png, checkpoint.pt (a folder per "
                     "optimizer with --compare)")
    out.add_argument("--checkpoint-every", type=int, default=0,
                     help="also checkpoint every N steps (always at the end of an epoch)")
    out.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                     help="continue from CHECKPOINT, or from --out-dir's checkpoint if there is one")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="tqdm progress bars (default: when stderr is a terminal)")
    return p


def resolve_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the preset, then from the defaults; check that they fit."""
    preset = PRESETS.get(args.preset, {})
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    if args.model is None:
        args.model = {"digits": "digits-cnn", "imagenet": "resnet50"}.get(args.data, "resnet18-cifar")
    try:
        check_model_name(args.model)
    except ValueError as err:
        raise UsageError(f"--model: {err}") from None
    args.optimizers = args.compare.split(",") if args.compare else [args.optimizer]
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            raise UsageError(f"--compare: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(args.optimizers)) != len(args.optimizers):
        raise UsageError(f"--compare lists an optimizer twice: {args.compare}")
    preset_family = base_of(preset.get("optimizer", DEFAULTS["optimizer"])) if preset else None
    args.recipes = {name: {**FAMILY_RECIPES[base_of(name)],
                           **({k: preset[k] for k in RECIPE_FLAGS if k in preset}
                              if base_of(name) == preset_family else {}),
                           **given} for name in args.optimizers}
    positive = ("lr", "epochs", "batch_size", "synthetic_steps", "eps")
    non_negative = ("weight_decay", "sam_rho", "msam_rho", "warmup_epochs", "rho_schedule_epochs",
                    "clip_grad", "momentum", "checkpoint_every")
    for key in positive + non_negative:
        values = [r[key] for r in args.recipes.values()] if key in RECIPE_FLAGS else [getattr(args, key)]
        value = min(values)
        if not math.isfinite(value) or value < 0 or (key in positive and value == 0):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} must be {'positive' if key in positive else '>= 0'}, got {value}")
    if args.rho_schedule != "constant" and not args.rho_schedule_epochs:
        raise UsageError(f"--rho-schedule {args.rho_schedule} needs --rho-schedule-epochs > 0")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    for key in ("image_size", "num_classes"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume: no checkpoint file {args.resume}")
    if args.resume and len(args.optimizers) > 1 and args.resume != "auto":
        raise UsageError("--resume CHECKPOINT takes one optimizer; with --compare use --resume "
                         "and --out-dir (each optimizer resumes from its own folder)")
    args.variant = {k: getattr(args, k) for k in VARIANT_FLAGS if getattr(args, k) is not None}
    if args.resume == "auto" and not args.out_dir:
        raise UsageError("--resume without a file needs --out-dir (where the checkpoint is)")
    return args


def hyper(args, name: str) -> Hyper:
    recipe = args.recipes[name]
    return Hyper(lr=recipe["lr"], momentum=args.momentum, weight_decay=recipe["weight_decay"],
                 betas=(args.beta1, args.beta2), eps=args.eps, sam_rho=args.sam_rho,
                 msam_rho=args.msam_rho)


def data_shape(args) -> ImageShape:
    natural = natural_shape(args.model)
    return ImageShape(natural.channels, args.image_size or natural.size,
                      args.num_classes or natural.num_classes)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warm-up to the full LR, then constant or cosine to zero (per step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_rho_schedule(opt, args, steps_per_epoch: int):
    """The ``--rho-schedule`` (a msam_fused.rho_schedulers object stepped every step), or None
    for a constant rho or an optimizer without one."""
    if args.rho_schedule == "constant" or not all("rho" in g for g in opt.param_groups):
        return None
    steps = max(1, round(args.rho_schedule_epochs * steps_per_epoch))
    cls = rho_schedulers.SCHEDULES[args.rho_schedule]
    if args.rho_schedule == "cosine":
        return cls(opt, total_steps=steps)
    if args.rho_schedule == "linear":
        return cls(opt, ramp_steps=steps)
    if args.rho_schedule == "step":
        return cls(opt, milestone=steps)
    return cls(opt, warmup_steps=steps)


# ------------------------------------------------------------------------------ one run
class Run:
    """One optimizer's training: model, optimizer, schedule, data position, log."""

    def __init__(self, name: str, args, proc: ddp.Process, data, out_dir):
        self.name, self.args, self.proc, self.data = name, args, proc, data
        self.out_dir = Path(out_dir) if out_dir else None
        device = proc.device
        if args.batch_size % proc.world:
            raise UsageError(f"--batch-size {args.batch_size} does not split over {proc.world} processes")
        self.batch = args.batch_size // proc.world
        self.steps_per_epoch = data.steps_per_epoch(args.batch_size)
        if self.steps_per_epoch < 1:
            raise UsageError(f"--batch-size {args.batch_size} is larger than the {data.num_train} "
                             f"training images of {data.name}")
        torch.manual_seed(args.seed)  # the same initial weights for every optimizer and rank
        self.net = build_model(args.model, data.shape).to(device)
        if args.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        try:
            self.opt = build_optimizer(name, self.net, hyper(args, name), backend=args.backend,
                                       torch_impl=args.torch_impl, variant=args.variant, seed=args.seed)
        except ValueError as err:
            raise UsageError(f"--optimizer {name}: {err}") from None
        if isinstance(self.opt, VARIANT_STEP_TYPES) and (args.amp == "fp16" or args.clip_grad or proc.world > 1):
            raise UsageError(f"{name}: {type(self.opt).__name__} trains through msam_fused.variants."
                             "train_step, without GradScaler, gradient clipping or DDP; drop "
                             "--amp fp16 / --clip-grad / torchrun for it")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, partial(
            lr_factor, warmup_steps=round(args.warmup_epochs * self.steps_per_epoch),
            total_steps=args.epochs * self.steps_per_epoch, schedule=args.schedule))
        self.rho_sched = make_rho_schedule(self.opt, args, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        self.ddp_model = ddp.wrap(self.net, proc, args.sync_bn)
        self.model = torch.compile(self.ddp_model) if args.compile else self.ddp_model
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.autocast = partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else nullcontext
        self.step_cfg = StepConfig(
            loss_fn=partial(nn.functional.cross_entropy, label_smoothing=args.label_smoothing),
            autocast=self.autocast, scaler=self.scaler, clip_grad=args.clip_grad,
            channels_last=args.channels_last, sam_ascent=args.sam_ascent)
        try:
            overlap_backward(name, self.opt, self.ddp_model, self.step_cfg)
        except ValueError as err:
            raise UsageError(f"--optimizer {name}: {err}") from None
        self.epoch, self.step = 0, 0                 # the data position: next batch to train on
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
        self.history: list[dict] = []
        self.wall_s = 0.0

    # --------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self):
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def trajectory_flags(self) -> dict:
        flags = {k: getattr(self.args, k) for k in TRAJECTORY_FLAGS}
        return {**flags, **self.args.recipes[self.name], "optimizer": self.name,
                "world_size": self.proc.world}

    def save(self) -> None:
        if self.checkpoint_path is None:
            return
        rng = ddp.all_gather(checkpoint.rng_state(), self.proc)  # each rank's own generators
        if not self.proc.is_main:
            return
        checkpoint.save({
            "format": CHECKPOINT_FORMAT, "flags": self.trajectory_flags(),
            "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rho_scheduler": self.rho_sched.state_dict() if self.rho_sched else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng, "position": {"epoch": self.epoch, "step": self.step},
            "epoch_sums": self.sums, "history": self.history,
            "timing": {"wall_s": self.wall_s},
        }, self.checkpoint_path)

    def restore(self, path) -> None:
        state = checkpoint.load(path, self.proc.device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"--resume: {path} is not a bench/train.py checkpoint")
        saved, now = state["flags"], self.trajectory_flags()
        differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
                  for k in now if saved.get(k) != now[k]]
        extend = differ and self.extends(saved, now, state["position"])
        if differ and not extend:
            raise UsageError(f"--resume: {path} was written by a different run ("
                             + "; ".join(differ) + "); resume with the same flags")
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if extend:  # the LR from here on is that of the longer schedule
            for group, base, factor in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
                group["lr"] = base * factor(self.sched.last_epoch)
            if self.proc.is_main:
                print(f"{self.name}: extending the finished run from {saved['epochs']} to "
                      f"{now['epochs']} epochs (the LR schedule is now that of {now['epochs']})",
                      file=sys.stderr)
        if self.rho_sched:
            self.rho_sched.load_state_dict(state["rho_scheduler"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"][self.proc.rank])
        self.epoch, self.step = state["position"]["epoch"], state["position"]["step"]
        self.sums = state["epoch_sums"].to(self.proc.device)
        self.history = state["history"]
        self.wall_s = state["timing"]["wall_s"]

    @staticmethod
    def extends(saved: dict, now: dict, position: dict) -> bool:
        """Only ``--epochs`` grew, and the checkpoint is the end of its run: train on."""
        others = [k for k in now if k != "epochs" and saved.get(k) != now[k]]
        finished = position == {"epoch": saved["epochs"], "step": 0}
        return not others and finished and now["epochs"] > saved["epochs"]

    # ------------------------------------------------------------------------ training
    def train(self, progress: bool, epoch_lines: bool) -> dict:
        """Train to ``--epochs``: a tqdm bar per epoch with ``progress``, a printed line per
        epoch with ``epoch_lines``."""
        from tqdm import tqdm

        args = self.args
        while self.epoch < args.epochs:
            started, busy, first_step = time.perf_counter(), 0.0, self.step
            bar = tqdm(total=self.steps_per_epoch, initial=self.step, leave=False,
                       desc=f"{self.name} epoch {self.epoch + 1}/{args.epochs}",
                       disable=not (progress and self.proc.is_main))
            tick = time.perf_counter()
            for x, y in self.data.train_batches(self.epoch, self.step, self.batch, args.seed,
                                                self.proc.shard):
                loss, logits = train_step(self.model, self.opt, x, y, self.step_cfg, self.ddp_model)
                self.sched.step()
                if self.rho_sched:
                    self.rho_sched.step()
                self.sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(),
                                          torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)])
                self.step += 1
                bar.update()
                if args.checkpoint_every and self.step % args.checkpoint_every == 0 \
                        and self.step < self.steps_per_epoch:
                    busy += self._lap(tick)
                    self.save()
                    tick = time.perf_counter()
            busy += self._lap(tick)
            bar.close()
            images = (self.steps_per_epoch - first_step) * args.batch_size
            self._end_epoch(images / busy if busy else None, time.perf_counter() - started)
            if epoch_lines and self.proc.is_main:
                print(epoch_line(self.name, self.history[-1], args.epochs, time.perf_counter() - started),
                      flush=True)
            self.save()
        return self.summary()

    def _lap(self, since: float) -> float:
        if self.proc.device.type == "cuda":
            torch.cuda.synchronize(self.proc.device)
        return time.perf_counter() - since

    def _end_epoch(self, images_per_s, epoch_s: float) -> None:
        train = ddp.all_sum(self.sums, self.proc).tolist()
        test_loss, test_acc = self.evaluate()
        self.wall_s += epoch_s
        group = self.opt.param_groups[0]
        self.history.append({
            "epoch": self.epoch + 1, "steps": (self.epoch + 1) * self.steps_per_epoch,
            "lr": group["lr"], "rho": group.get("rho"),
            "train_loss": train[0] / train[2], "train_acc": train[1] / train[2],
            "test_loss": test_loss, "test_acc": test_acc,
            "images_per_s": images_per_s,
            "wall_time_s": self.wall_s,
        })
        self.epoch, self.step = self.epoch + 1, 0
        self.sums.zero_()
        if self.proc.is_main and self.out_dir:
            checkpoint.write_json(self.out_dir / "log.json", self.log())

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy at the true weights (MSAM: inside ``unperturbed()``)."""
        unperturbed = getattr(self.opt, "unperturbed", nullcontext)
        sums = torch.zeros(3, dtype=torch.float64, device=self.proc.device)
        self.net.eval()
        with unperturbed():
            for x, y in self.data.test_batches(max(self.batch, 256), self.proc.shard):
                if self.args.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self.autocast():
                    logits = self.net(x)
                loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
                sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)])
        self.net.train()
        loss, correct, count = ddp.all_sum(sums, self.proc).tolist()
        return loss / count, correct / count

    def log(self) -> dict:
        return {"optimizer": self.name, "backend": optimizer_backend(self.opt),
                "flags": self.trajectory_flags(), "epochs": self.history}

    def summary(self) -> dict:
        last = self.history[-1]
        return {"optimizer": self.name, "backend": optimizer_backend(self.opt),
                "test_acc": last["test_acc"], "test_loss": last["test_loss"],
                "images_per_s": typical_speed(self.history),
                "history": self.history}


def typical_speed(history: list) -> Optional[float]:
    """Images/s of a run: the median over its epochs after the first, which pays one-time costs
    (lazy initialisation, allocator growth, compilation) that would bias a comparison against
    whichever optimizer trains first; the first epoch when there is no other."""
    speeds = [h["images_per_s"] for h in history[1:] if h["images_per_s"]]
    speeds = speeds or [h["images_per_s"] for h in history[:1] if h["images_per_s"]]
    return statistics.median(speeds) if speeds else None


def epoch_line(name: str, record: dict, epochs: int, seconds: float) -> str:
    speed = f"{record['images_per_s']:.0f} images/s" if record["images_per_s"] else "- images/s"
    return (f"epoch {record['epoch']}/{epochs} {name}: train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%, test loss {record['test_loss']:.4f} "
            f"acc {100 * record['test_acc']:.2f}%, {speed}, {seconds:.1f} s")


# ---------------------------------------------------------------------------------- main
def configure_determinism(args) -> None:
    threads = args.threads or (1 if args.data == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def train_one(name: str, args, proc: ddp.Process, data, progress: bool, epoch_lines: bool) -> dict:
    out_dir = Path(args.out_dir) / name if args.out_dir and len(args.optimizers) > 1 else args.out_dir
    run = Run(name, args, proc, data, out_dir)
    if args.resume:
        path = run.checkpoint_path if args.resume == "auto" else Path(args.resume)
        if path is not None and path.is_file():
            run.restore(path)
            if proc.is_main:
                print(f"{name}: resumed from {path} at epoch {run.epoch + 1}, step {run.step}",
                      file=sys.stderr)
    result = run.train(progress, epoch_lines)
    if proc.is_main and run.out_dir:
        from bench.plots import plot_curves

        plot_curves({name: run.history}, run.out_dir / "curves.png")
    return result


def print_table(results: dict) -> None:
    print(f"{'optimizer':<11} {'backend':<10} {'test acc':>9} {'images/s':>10} {'vs base':>8}")
    for name, r in results.items():
        base = results.get(base_of(name), results[next(iter(results))])
        ratio = r["images_per_s"] / base["images_per_s"]
        print(f"{name:<11} {r['backend']:<10} {100 * r['test_acc']:>8.2f}% "
              f"{r['images_per_s']:>10.0f} {ratio:>8.2f}")


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_flags(args)
        configure_determinism(args)
        proc = ddp.start(args.device)
    except UsageError as err:
        parser.error(str(err))
    try:
        data = load_data(args.data, data_dir=args.data_dir, device=proc.device, seed=args.seed,
                         shape=data_shape(args), synthetic_batch=args.batch_size // proc.world,
                         synthetic_steps=args.synthetic_steps, workers=args.workers)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        # A bar in a terminal; in a log file (stdout not a terminal) a line per epoch.
        epoch_lines = not sys.stdout.isatty()
        results = {name: train_one(name, args, proc, data, progress, epoch_lines)
                   for name in args.optimizers}
    except (UsageError, DataError, msam_fused.BackendUnavailableError) as err:
        ddp.stop(proc)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if proc.is_main:
        print_table(results)
        if args.out_dir and len(results) > 1:
            from bench.plots import plot_curves

            checkpoint.write_json(Path(args.out_dir) / "summary.json", results)
            plot_curves({n: r["history"] for n, r in results.items()}, Path(args.out_dir) / "curves.png")
    ddp.stop(proc)
    return results


if __name__ == "__main__":
    main()
