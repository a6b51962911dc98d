"""Train a small CNN on scikit-learn's digits with MSAM or SAM on several processes.

Two CPU processes (gloo), no download needed::

    torchrun --nproc_per_node=2 examples/ddp_digits.py                     # MSAM under DDP
    torchrun --nproc_per_node=2 examples/ddp_digits.py --optimizer sam --ascent global
    torchrun --nproc_per_node=2 examples/ddp_digits.py --fsdp              # sharded state (FSDP2)

On GPUs the same command uses NCCL and one GPU per process (``--nproc_per_node`` = GPUs);
see docs/distributed.md for multi-node commands. Each rank trains on its own half (third,
...) of every global batch; DDP averages the gradients, so the run is the global batch's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import msam_fused
from msam_fused.distributed import (ASCENTS, DEFAULT_ASCENT, check_replicas_identical,
                                    load_checkpoint, sam_step, save_checkpoint, unperturbed)


def digits(device):
    """(train, test) tensors, split and shuffled the same way on every rank."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(device), y[order].to(device)
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def distribute(model, args, device):
    """DDP, or FSDP2 per layer with parameters as DTensor shards; optimizers come after this."""
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not args.fsdp:
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_optimizer(args, params):
    if args.optimizer == "msam":
        return msam_fused.MSAM(params, lr=args.lr, momentum=0.9, weight_decay=args.wd, rho=args.rho)
    if args.optimizer == "adamw-msam":
        return msam_fused.AdamWMSAM(params, lr=args.lr, weight_decay=args.wd, rho=args.rho)
    return msam_fused.SAM(params, torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=0.9,
                          weight_decay=args.wd)


@torch.no_grad()
def accuracy(model, x, y):
    """Every rank evaluates (FSDP2 needs all of them for its all-gathers)."""
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="msam", choices=["msam", "adamw-msam", "sam"])
    parser.add_argument("--ascent", default=None, choices=ASCENTS,
                        help=f"SAM's ascent: per rank (local) or all-reduced (global); default: "
                             f"{DEFAULT_ASCENT!r} under DDP, 'global' (the only one) under FSDP2")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters and state (FSDP2)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (GPU only)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--rho", type=float, default=None,
                        help="default: 0.3 for MSAM, 0.05 for SAM")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="save a (sharded) checkpoint of model and optimizer after training")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="start from a checkpoint written by --save (same optimizer)")
    args = parser.parse_args(argv)
    if args.rho is None:
        args.rho = 0.05 if args.optimizer == "sam" else 0.3
    if args.ascent is None:
        args.ascent = "global" if args.fsdp else DEFAULT_ASCENT

    use_cuda = torch.cuda.is_available()
    if args.sync_bn and not use_cuda:
        raise SystemExit("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of {world} ranks")
    local_batch = args.global_batch // world

    torch.manual_seed(0)  # the same initial weights on every rank
    (xtr, ytr), (xte, yte) = digits(device)
    model = distribute(cnn().to(device), args, device)
    opt = make_optimizer(args, model.parameters())
    if args.resume:
        load_checkpoint(args.resume, model, opt)
    gen = torch.Generator().manual_seed(1)  # the same batch order on every rank
    for epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen).to(device)
        start, seen = time.perf_counter(), 0
        for i in range(0, len(xtr) - args.global_batch + 1, args.global_batch):
            mine = order[i + rank * local_batch:i + (rank + 1) * local_batch]
            x, y = xtr[mine], ytr[mine]
            if isinstance(opt, msam_fused.SAM):
                sam_step(model, opt, lambda: F.cross_entropy(model(x), y), ascent=args.ascent)
            else:
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            seen += args.global_batch
        if use_cuda:
            torch.cuda.synchronize()
        images_per_s = seen / (time.perf_counter() - start)
        if isinstance(opt, msam_fused.SAM):
            acc = accuracy(model, xte, yte)
        else:
            with unperturbed(model, opt):  # the true weights (FSDP2-safe opt.unperturbed())
                acc = accuracy(model, xte, yte)
        if rank == 0:
            print(f"epoch {epoch + 1:3d}  test accuracy {100 * acc:6.2f}%  "
                  f"{images_per_s:8.0f} images/s on {world} ranks", flush=True)
    if not args.fsdp:
        check_replicas_identical(model, opt)
        if rank == 0:
            print("ranks bit-identical: parameters and optimizer state", flush=True)
    if args.save:
        save_checkpoint(args.save, model, opt)
        if rank == 0:
            print(f"checkpoint saved to {args.save}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
