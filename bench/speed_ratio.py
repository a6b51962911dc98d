"""Speed ratios of the paper's Table 1: images/s of SAM and MSAM relative to their base optimizer.

SGD, NAG, SAM and MSAM (AdamW, SAM-AdamW and AdamW-MSAM for the ViT; ``msam-overlap`` on
request: MSAM with its first pass run during backward) train the same model
from the same initialisation on the same synthetic batch, in one process, back to back:
after a warm-up, ``--rounds`` rounds each run ``--steps`` steps of every optimizer in turn,
and images/s comes from the median round (interleaving makes load changes hit all alike).
SAM and MSAM run on every msam_fused backend available here (found at run time). Memory:
on CUDA the peak allocated during the optimizer's own warm-up steps (``max_memory_allocated``
above what was allocated before it was built); everywhere the optimizer-state bytes. For the
optimizers that take one backward per step it also reports the *exposed* step time: from the
end of backward to the end of the step (CUDA events on a GPU), what the optimizer adds after
backward.
Prints the table, writes JSON (schema in docs/benchmarks.md) and a bar chart::

    python bench/speed_ratio.py --quick                      # CPU, a few minutes
    python bench/speed_ratio.py --model wrn-28-10 --batch-size 256 --device cuda
    python bench/speed_ratio.py --model vit-s32 --amp bf16 --batch-size 256
    torchrun --nproc-per-node 8 bench/speed_ratio.py --model wrn-28-10   # DDP, global images/s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import bench/ as a package of the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

import msam_fused
from bench import ddp, provenance
from bench.checkpoint import write_json
from bench.data import SyntheticData
from bench.micro import summarize
from bench.models import ImageShape, build_model, check_model_name, natural_shape
from bench.optimizers import (ASCENTS, OPTIMIZERS, TORCH_IMPLS, VARIANT_STEP_TYPES, Hyper, StepConfig,
                              base_of, build_optimizer, forward_backward, optimizer_backend,
                              optimizer_step, overlap_backward, train_step, uses_msam_fused)

SCHEMA = "msam-fused/speed-ratio/1"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds besides the parameters and their gradients
    (momenta, moments, SAM's copy of the weights, ...), each storage counted once."""
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    seen_objects, storages = set(), {}

    def walk(obj) -> None:
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in params:
                storage = obj.untyped_storage()
                storages[(obj.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple, set)):
            for item in obj:
                walk(item)
        elif isinstance(obj, torch.optim.Optimizer):
            walk(vars(obj))

    walk(opt)
    return sum(storages.values())


class Contender:
    """One optimizer training its own copy of the model."""

    def __init__(self, name: str, backend: str, args, proc: ddp.Process, shape: ImageShape,
                 cfg: StepConfig):
        torch.manual_seed(args.seed)
        self.name = name
        self.net = build_model(args.model, shape).to(proc.device)
        if args.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        hp = Hyper(lr=args.lr, weight_decay=5e-4 if base_of(name) == "sgd" else 0.05)
        self.opt = build_optimizer(name, self.net, hp, backend=backend, torch_impl=args.torch_impl,
                                   seed=args.seed)
        self.label = f"{name}[{optimizer_backend(self.opt)}]"
        self.ddp_model = ddp.wrap(self.net, proc, sync_bn=False)
        overlap_backward(name, self.opt, self.ddp_model, cfg)
        self.model = torch.compile(self.ddp_model) if args.compile else self.ddp_model

    def steps(self, x, y, cfg: StepConfig, count: int) -> None:
        for _ in range(count):
            train_step(self.model, self.opt, x, y, cfg, self.ddp_model)

    @property
    def one_backward(self) -> bool:
        """The step follows one backward (not SAM's two passes, nor a variant's own step)."""
        return not isinstance(self.opt, (msam_fused.SAM, *VARIANT_STEP_TYPES))

    def exposed_step_times(self, x, y, cfg: StepConfig, count: int) -> list:
        """Seconds from the end of backward to the end of the step: perf_counter on a CPU, CUDA
        events recorded after the backward's work and after the step's on a GPU."""
        cuda = x.device.type == "cuda"
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        for _ in range(count):
            forward_backward(self.model, x, y, cfg)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                optimizer_step(self.model, self.opt, cfg)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                optimizer_step(self.model, self.opt, cfg)
                times.append(time.perf_counter() - t0)
        return times


def contenders_for(name: str, args, proc, shape, cfg: StepConfig) -> list:
    """One optimizer on every backend asked for (msam_fused ones: every available backend;
    msam-overlap: those that have its passes)."""
    if not uses_msam_fused(name):
        return [Contender(name, "auto", args, proc, shape, cfg)]
    found = provenance.available_backends(proc.device)
    backends = [b for b, reason in found.items() if reason is None] if args.backends == "all" \
        else args.backends.split(",")
    out = []
    for backend in backends:
        try:
            out.append(Contender(name, backend, args, proc, shape, cfg))
        except NotImplementedError as err:  # a backend without the overlapped step
            if args.backends != "all":
                raise msam_fused.BackendUnavailableError(str(err)) from None
            print(f"{name}[{backend}]: skipped: {err}", flush=True)
    return out


def measure(args, proc: ddp.Process) -> dict:
    shape = ImageShape(natural_shape(args.model).channels, args.image_size or natural_shape(args.model).size,
                       args.num_classes or natural_shape(args.model).num_classes)
    batch = args.batch_size // proc.world
    data = SyntheticData(shape, proc.device, batch, 1, args.seed)
    x, y = data.train_x, data.train_y
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    cfg = StepConfig(autocast=partial(torch.autocast, proc.device.type, dtype=amp_dtype) if amp_dtype
                     else nullcontext, channels_last=args.channels_last,
                     sam_ascent=args.sam_ascent,
                     scaler=torch.amp.GradScaler(proc.device.type) if args.amp == "fp16" else None)
    cuda = proc.device.type == "cuda"
    rows, contenders = {}, []
    for name in args.optimizers:  # build and warm up one at a time, to see each one's peak
        before = len(contenders)
        if cuda:
            torch.cuda.synchronize(proc.device)
            baseline = torch.cuda.memory_allocated(proc.device)
            torch.cuda.reset_peak_memory_stats(proc.device)
        contenders += contenders_for(name, args, proc, shape, cfg)
        for c in contenders[before:]:
            c.steps(x, y, cfg, args.warmup)
            peak = None
            if cuda:
                torch.cuda.synchronize(proc.device)
                peak = torch.cuda.max_memory_allocated(proc.device) - baseline
                baseline = torch.cuda.memory_allocated(proc.device)
                torch.cuda.reset_peak_memory_stats(proc.device)
            rows[c.label] = {"optimizer": c.name, "backend": optimizer_backend(c.opt),
                             "base": base_of(c.name), "peak_memory_bytes": peak,
                             "optimizer_state_bytes": state_bytes(c.opt)}
    rounds = {c.label: [] for c in contenders}
    for _ in range(args.rounds):
        for c in contenders:
            ddp.barrier(proc)
            t0 = time.perf_counter()
            c.steps(x, y, cfg, args.steps)
            if cuda:
                torch.cuda.synchronize(proc.device)
            rounds[c.label].append((time.perf_counter() - t0) / args.steps)
    for label, times in rounds.items():
        step = summarize(times)
        rows[label]["step_time_s"] = step
        rows[label]["images_per_s"] = args.batch_size / step["median"]
    for c in contenders:  # after the rounds, so that it cannot disturb them
        rows[c.label]["exposed_step_s"] = summarize(c.exposed_step_times(
            x, y, cfg, args.rounds)) if c.one_backward else None
    add_ratios(rows)
    return rows


def add_ratios(rows: dict) -> None:
    """Images/s and memory over those of the base optimizer (torch's SGD or AdamW)."""
    for row in rows.values():
        base = next((r for r in rows.values() if r["optimizer"] == row["base"]), None)
        row["ratio"] = row["images_per_s"] / base["images_per_s"] if base else None
        mem = "peak_memory_bytes" if row["peak_memory_bytes"] is not None else "optimizer_state_bytes"
        row["memory_kind"] = mem
        row["memory_ratio"] = row[mem] / base[mem] if base and base[mem] else None


def table(rows: dict) -> str:
    lines = [f"{'optimizer':<24} {'images/s':>10} {'vs base':>8} {'step ms':>9} {'exposed ms':>11} "
             f"{'memory MiB':>11} {'vs base':>8}"]
    for label, r in rows.items():
        mem = r[r["memory_kind"]] / 2**20
        exposed = "-" if r.get("exposed_step_s") is None else f"{1e3 * r['exposed_step_s']['median']:.2f}"
        lines.append(f"{label:<24} {r['images_per_s']:>10.1f} {_fmt(r['ratio']):>8} "
                     f"{1e3 * r['step_time_s']['median']:>9.2f} {exposed:>11} {mem:>11.1f} "
                     f"{_fmt(r['memory_ratio']):>8}")
    kind = next(iter(rows.values()))["memory_kind"]
    lines.append("memory: " + ("peak allocated (CUDA)" if kind == "peak_memory_bytes"
                               else "optimizer state (momenta, moments, SAM's weight copy)"))
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(result: dict, path) -> None:
    from bench.plots import plot_bars

    rows = result["results"]
    labels = list(rows)
    cfg = result["config"]
    plot_bars([("images/s relative to the base optimizer", [rows[k]["ratio"] or 0 for k in labels], 1.0),
               ("memory relative to the base optimizer", [rows[k]["memory_ratio"] or 0 for k in labels], 1.0)],
              labels, path, f"{cfg['model']}, batch {cfg['batch_size']}, {result['device']['name']}",
              columns=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/speed_ratio.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and few steps (minutes on a CPU)")
    p.add_argument("--model", help="default: wrn-28-10 (wrn-16-4 with --quick)")
    p.add_argument("--optimizers", help="comma-separated; default sgd,nag,sam,msam "
                   "(adamw,sam-adamw,adamw-msam for vit-s32)")
    p.add_argument("--backends", default="all", help="msam_fused backends for SAM/MSAM: 'all' "
                   "available here, or a comma-separated list")
    p.add_argument("--torch-impl", default="fused", choices=TORCH_IMPLS,
                   help="torch.optim implementation of the base optimizers")
    p.add_argument("--sam-ascent", default="local", choices=ASCENTS,
                   help="SAM under DDP: per-rank ascent (local) or all-reduced (global)")
    p.add_argument("--batch-size", type=int, help="global batch (default 256; 16 with --quick)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, help="steps per optimizer before timing (default 5; 2 with --quick)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 10; 4 with --quick)")
    p.add_argument("--steps", type=int, help="steps per optimizer per round (default 5; 1 with --quick)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (PNG beside it); default runs/speed-ratio-<machine>-<model>.json")
    return p


def resolve(p: argparse.ArgumentParser, args) -> None:
    quick = args.quick
    args.model = args.model or ("wrn-16-4" if quick else "wrn-28-10")
    try:
        check_model_name(args.model)
    except ValueError as err:
        p.error(f"--model: {err}")
    vit = args.model.startswith("vit")
    args.optimizers = (args.optimizers or ("adamw,sam-adamw,adamw-msam" if vit else "sgd,nag,sam,msam")).split(",")
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            p.error(f"--optimizers: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    args.batch_size = args.batch_size or (16 if quick else 256)
    args.warmup = 2 if quick and args.warmup is None else (5 if args.warmup is None else args.warmup)
    args.rounds = args.rounds or (4 if quick else 10)
    args.steps = args.steps or (1 if quick else 5)
    for key in ("batch_size", "rounds", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first steps create state and measure memory)")


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    resolve(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    proc = ddp.start(args.device)
    if args.batch_size % proc.world:
        p.error(f"--batch-size {args.batch_size} does not split over {proc.world} processes")
    try:
        rows = measure(args, proc)
    except msam_fused.BackendUnavailableError as err:
        ddp.stop(proc)
        p.error(f"--backends: {err}")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    result = {**provenance.header(proc.device, {**config, "world_size": proc.world}, SCHEMA),
              "results": rows}
    if proc.is_main:
        print(table(rows))
        out = Path(args.out or provenance.RUNS / f"speed-ratio-{provenance.machine_tag(proc.device)}-"
                                                 f"{args.model}{'-quick' if args.quick else ''}.json")
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    ddp.stop(proc)
    return result


if __name__ == "__main__":
    main()
