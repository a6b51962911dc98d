"""Optimizer-step microbenchmarks: every backend against torch.optim, on real parameter sets.

For each parameter set (the tensors of ResNet-50, WRN-28-10, WRN-16-4, ViT-S/32, and synthetic
sets of a given total size split into a given number of tensors) it times one ``step()`` of

* ``torch.optim.SGD`` (momentum) and ``AdamW``, each as for-loop, foreach and fused,
* MSAM and AdamW-MSAM on every msam_fused backend available here (found at run time;
  ``reference`` is the per-tensor implementation in the authors' style),
* MSAM with its first pass overlapped with backward (``msam-overlap``, ``MSAM.overlap_backward``):
  the step timed is what is left after backward (the *exposed* time), and the backward's extra
  time with the hidden pass is measured beside it,
* SAM's perturbation and restore (``first_step`` + the return to ``w``, base step excluded),
* SAM's whole optimizer part around ``SGD(fused=True)`` (ascent, return to ``w``, base step),
  on every backend and written with torch's foreach ops (``sam[torch-foreach]``: the obvious
  fast SAM, which returns to ``w`` by subtracting ``e``, not exactly),

and reports the median and spread, the effective bandwidth (the minimal bytes the step must
move, divided by its time), that bandwidth as a fraction of this device's copy bandwidth
(measured in the same run), and the kernel launches (CUDA) or dispatched ops (CPU) per step,
from ``torch.profiler``. Writes JSON (schema in docs/benchmarks.md) and a PNG::

    python bench/micro.py --quick                       # a few minutes on a CPU
    python bench/micro.py --device cuda --out bench/results/micro-h100.json   # default: runs/
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: import bench/ as a package of the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

import msam_fused
from bench import provenance
from bench.checkpoint import write_json
from bench.models import parameter_shapes

SCHEMA = "msam-fused/micro/1"
MODEL_SETS = ("resnet50", "wrn-28-10", "wrn-16-4", "vit-s32")

# Minimal memory traffic of one step, in passes over (parameters, gradients, state tensors).
# SGD reads p, g, v and writes p, v; AdamW reads p, g, m, s and writes p, m, s. MSAM needs a
# second pass after the global norm (read p, v; write p); AdamW-MSAM likewise with m. SAM's
# perturb and restore: read g for the norm, read p and g and write p for the ascent, and the
# same again to return (or, equally, write and read back a copy of p).
# MSAM overlapped with backward, after backward (fp32/fp64): read p, v' and v_old (kept in the
# gradient's memory), write p; bf16/fp16 parameters keep the plain one-pass step (as SGD).
# SAM's whole optimizer part: read g1 for the norm, read p and g1 and write w + e while keeping
# w, then SGD's step with g2.
TRAFFIC = {"sgd": (2, 1, 2), "adamw": (2, 1, 4), "msam": (4, 1, 3), "adamw-msam": (4, 1, 5),
           "sam-perturb-restore": (4, 3, 0), "msam-overlap": (2, 1, 1), "sam": (4, 3, 2)}
BASELINE = {"sgd": "sgd", "msam": "sgd", "sam-perturb-restore": "sgd", "adamw": "adamw",
            "adamw-msam": "adamw", "msam-overlap": "sgd", "sam": "sgd"}


@dataclass
class Case:
    """One implementation of one algorithm: ``make(params)`` returns the step to time."""

    algorithm: str
    impl: str
    make: Callable
    state_fp32: bool  # msam_fused keeps fp32 state for bf16/fp16 parameters; torch does not

    @property
    def label(self) -> str:
        return f"{self.algorithm}[{self.impl}]"


class _NoStep(torch.optim.Optimizer):
    """A base optimizer that does nothing, so SAM's perturb and restore are timed alone."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _torch_step(cls, impl: str, **hyper):
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return lambda params: cls(params, **hyper, **flags).step


def _sam_step(backend: str):
    def make(params):
        sam = msam_fused.SAM(params, _NoStep, rho=0.05, backend=backend)

        def step():
            sam.first_step()
            sam.second_step()
        return step
    return make


def _sam_sgd_step(backend: str, **sgd):
    """SAM's optimizer part around ``SGD(fused=True)``: ``first_step`` and ``second_step`` with
    the preset gradients as both ``g1`` and ``g2``."""
    def make(params):
        sam = msam_fused.SAM(params, torch.optim.SGD, rho=0.05, backend=backend, fused=True, **sgd)

        def step():
            sam.first_step()
            sam.second_step()
        return step
    return make


def _foreach_sam_sgd_step(**sgd):
    """The same with torch's foreach ops: ``e = rho * g / ||g||`` formed in the gradients' memory
    (as a SAM that owns ``g1`` would), ``p += e``, ``p -= e``, then fused SGD."""
    def make(params):
        sgd_step = torch.optim.SGD(params, fused=True, **sgd).step

        @torch.no_grad()
        def step():
            grads = [p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, 0.05 / (norm + msam_fused.EPS_NORM))
            torch._foreach_add_(params, grads)
            torch._foreach_sub_(params, grads)
            sgd_step()
        return step
    return make


def _overlapped_msam_step(backend: str, **hyper):
    """MSAM with ``overlap_backward``: ``step.prepare()`` runs a backward whose gradients are
    the preset ones (loss ``sum <p, g>``), so the first pass runs in it; ``step()`` is what is
    left after backward. ``step.backward_without_pass()`` is the same backward, paused."""
    def make(params):
        opt = msam_fused.MSAM(params, rho=0.3, backend=backend, **hyper)
        handle = opt.overlap_backward()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None

        def backward():
            sum((p * g).sum() for p, g in zip(params, grads)).backward()

        def backward_without_pass():
            with handle.paused():
                backward()
            for p in params:
                p.grad = None

        step = opt.step
        return _Prepared(step, backward, backward_without_pass)
    return make


class _Prepared:
    """A step that needs ``prepare()`` (untimed) before each call."""

    def __init__(self, step, prepare, backward_without_pass):
        self.step, self.prepare, self.backward_without_pass = step, prepare, backward_without_pass

    def __call__(self):
        return self.step()


def call_prepared(step) -> None:
    """One call of ``step``, after its preparation if it has one."""
    if isinstance(step, _Prepared):
        step.prepare()
    step()


def cases(device: torch.device) -> tuple[list[Case], dict]:
    """Every implementation to time on ``device``, and why the missing backends are missing."""
    found = provenance.available_backends(device)
    backends = [name for name, reason in found.items() if reason is None]
    sgd = dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)
    adamw = dict(lr=1e-4, weight_decay=0.1)
    out = []
    for impl in ("for-loop", "foreach", "fused"):
        out.append(Case("sgd", f"torch-{impl}", _torch_step(torch.optim.SGD, impl, **sgd), False))
        out.append(Case("adamw", f"torch-{impl}", _torch_step(torch.optim.AdamW, impl, **adamw), False))
    out.append(Case("sam", "torch-foreach", _foreach_sam_sgd_step(**sgd), False))
    for b in backends:
        out.append(Case("msam", b, lambda params, b=b: msam_fused.MSAM(params, rho=0.3, backend=b, **sgd).step, True))
        out.append(Case("adamw-msam", b, lambda params, b=b: msam_fused.AdamWMSAM(params, rho=1.0, backend=b, **adamw).step, True))
        out.append(Case("sam-perturb-restore", b, _sam_step(b), True))
        out.append(Case("sam", b, _sam_sgd_step(b, **sgd), True))
        out.append(Case("msam-overlap", b, _overlapped_msam_step(b, **sgd), True))
    return out, {name: reason for name, reason in found.items() if reason}


# ---------------------------------------------------------------------------- parameter sets
def synthetic_shapes(total: int, count: int) -> list[torch.Size]:
    """``count`` tensors of ``total`` elements together, of sizes varying over a factor ~4
    (as a model's do) and not multiples of a vector width."""
    weights = [1 + 3 * ((i * 7919) % count) / max(1, count - 1) for i in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) | 1 for w in weights]
    sizes[-1] = max(1, total - sum(sizes[:-1]))
    return [torch.Size([s]) for s in sizes]


def param_sets(names: list, totals: list, counts: list, skipped: dict) -> dict:
    """Shapes per set; a model that cannot be built here (torchvision missing) goes to ``skipped``."""
    sets = {}
    for name in names:
        try:
            sets[name] = parameter_shapes(name)
        except RuntimeError as err:
            skipped[name] = str(err)
            print(f"{name}: skipped: {err}", flush=True)
    for total in totals:
        for count in counts:
            sets[f"synthetic-{_short(total)}x{count}"] = synthetic_shapes(total, count)
    return sets


def _short(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable, device: torch.device, warmup: int, repeats: int) -> tuple[list, str]:
    """Seconds per call of ``step``, ``repeats`` samples after ``warmup`` calls, and the timer.

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls) where triton is installed,
    else CUDA events around each call. CPU: ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        call_prepared(step)
    synchronize(device)
    if isinstance(step, _Prepared):
        return _prepared_times(step, device, repeats), "prepared, " + (
            "cuda events" if device.type == "cuda" else "time.perf_counter")
    if device.type == "cuda":
        samples = _cuda_event_times(step, min(repeats, 5))
        try:
            from triton.testing import do_bench

            # do_bench takes milliseconds of timing, not a count: aim at ``repeats`` calls.
            budget_ms = 1e3 * statistics.median(samples) * repeats
            times = do_bench(step, warmup=0, rep=max(1.0, budget_ms), return_mode="all")
            return [t / 1e3 for t in times], "triton.testing.do_bench"
        except (ImportError, TypeError, ValueError, AssertionError):  # no triton, or no "all" mode
            return samples + _cuda_event_times(step, repeats - len(samples)), "cuda events"
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return samples, "time.perf_counter"


def _prepared_times(step: "_Prepared", device: torch.device, repeats: int) -> list:
    """Seconds per call of a step after its (untimed) preparation: on CUDA between events
    recorded after the preparation's work and after the step's, so the GPU time the step
    adds once backward is done."""
    samples = []
    for _ in range(repeats):
        step.prepare()
        if device.type == "cuda":
            samples += _cuda_event_times(step, 1)
        else:
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
    return samples


def hidden_work(step: "_Prepared", device: torch.device, repeats: int) -> dict:
    """The backward with and without the overlapped pass, alternating: what the pass adds to
    backward (on a CPU, or a GPU stream, it runs in line with the backward's own work)."""
    def timed(fn) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0

    with_pass, without = [], []
    for _ in range(repeats):
        with_pass.append(timed(step.prepare))
        step()  # applies the update, so that the next backward may run its pass
        without.append(timed(step.backward_without_pass))
    return {"backward_with_pass_s": summarize(with_pass), "backward_without_pass_s": summarize(without),
            "hidden_s": statistics.median(with_pass) - statistics.median(without)}


def _cuda_event_times(step: Callable, repeats: int) -> list:
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def summarize(samples: list) -> dict:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else ordered * 9
    return {"median": statistics.median(ordered), "p10": q[0], "p90": q[-1],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def copy_bandwidth(device: torch.device, numel: int, warmup: int, repeats: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` on float32 buffers: read + write of ``numel`` elements."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    samples, _ = time_step(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * 4 * numel / statistics.median(samples)


def launches_per_step(step: Callable, device: torch.device, steps: int = 1) -> float:
    """CUDA: device activities (kernels, copies) per step. CPU: operator calls per step that
    are not inside another operator (what a CPU "launch" is: one dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cpu":
        # Kineto, read when the first profile starts, would log two lines per profile and an
        # error from probing for a GPU (a CUDA build of torch on a machine without one).
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above its highest level, USDT (5)
    call_prepared(step)
    if isinstance(step, _Prepared):
        steps = 1
        step.prepare()  # outside the profile: only what is left after backward counts
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        def is_op(e):
            return e is not None and "::" in e.name
        count = sum(1 for e in events if is_op(e) and not is_op(e.cpu_parent))
    return count / steps


# ---------------------------------------------------------------------------------- the run
def make_params(shapes, device, dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device, dtype=dtype) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device, dtype=dtype) * 1e-3 for s in shapes]
    return params, grads


def minimal_bytes(algorithm: str, numel: int, dtype: torch.dtype, state_fp32: bool) -> int:
    if algorithm == "msam-overlap" and dtype in (torch.float16, torch.bfloat16):
        algorithm = "sgd"  # the gradient cannot hold fp32 momenta: the plain one-pass step is left
    p_passes, g_passes, s_passes = TRAFFIC[algorithm]
    size = torch.empty((), dtype=dtype).element_size()
    state_size = 4 if state_fp32 and dtype in (torch.float16, torch.bfloat16) else size
    return numel * ((p_passes + g_passes) * size + s_passes * state_size)


def bench_set(set_name, shapes, all_cases, args, device, dtype, copy_bps) -> list:
    """Time every case on one parameter set.

    On a CPU (shared with other work, time-sliced) the cases are timed in interleaved rounds,
    one call of each per round, so that load changes hit them all alike; on a GPU each case
    is timed on its own with device timers.
    """
    numel = sum(math.prod(s) for s in shapes)
    base_params, grads = make_params(shapes, device, dtype)
    rows, steps = [], {}
    for case in all_cases:
        params = [p.clone().requires_grad_() for p in base_params]
        for p, g in zip(params, grads):
            p.grad = g
        try:
            steps[case.label] = (case, case.make(params))
            for _ in range(args.warmup):
                call_prepared(steps[case.label][1])
        except (RuntimeError, ValueError) as err:  # e.g. a fused torch optimizer this device
            # lacks, or a backend without the overlapped step
            steps.pop(case.label, None)
            rows.append({"param_set": set_name, "algorithm": case.algorithm, "impl": case.impl,
                         "skipped": str(err).splitlines()[0]})
    synchronize(device)
    if device.type == "cuda":
        timed = {label: time_step(step, device, 0, args.repeats) for label, (_, step) in steps.items()}
    else:
        timed = interleaved_times({label: step for label, (_, step) in steps.items()}, args.repeats)
    for label, (case, step) in steps.items():
        samples, timer = timed[label]
        stats = summarize(samples)
        moved = minimal_bytes(case.algorithm, numel, dtype, case.state_fp32)
        rows.append({"param_set": set_name, "num_tensors": len(shapes), "numel": numel,
                     "algorithm": case.algorithm, "impl": case.impl, "timer": timer,
                     "time_s": stats, "minimal_bytes": moved, "gbps": moved / stats["median"] / 1e9,
                     "copy_fraction": moved / stats["median"] / copy_bps,
                     "launches_per_step": launches_per_step(step, device) if args.profile else None})
        hidden = ""
        if isinstance(step, _Prepared):
            rows[-1].update(hidden_work(step, device, args.repeats))
            hidden = f" (exposed; hidden in backward: {1e3 * rows[-1]['hidden_s']:.3f} ms)"
        print(f"{set_name:<22} {label:<32} {1e3 * stats['median']:>10.3f} ms "
              f"{moved / stats['median'] / 1e9:>8.2f} GB/s{hidden}", flush=True)
    add_ratios(rows)
    return rows


def interleaved_times(steps: dict, repeats: int) -> dict:
    """CPU: ``repeats`` rounds, each calling every step once, timed with perf_counter."""
    samples = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            if isinstance(step, _Prepared):
                step.prepare()  # the backward: not part of the step
            t0 = time.perf_counter()
            step()
            samples[label].append(time.perf_counter() - t0)
    return {label: (times, "time.perf_counter, interleaved") for label, times in samples.items()}


def add_ratios(rows: list) -> None:
    """Each step's median time over the fastest torch.optim implementation of its base
    (``vs_fastest_torch``) and, where the same algorithm is also written with torch's ops (SAM),
    over that (``vs_torch_same_algorithm``)."""
    def fastest_torch(algorithm):
        times = [r["time_s"]["median"] for r in rows if "time_s" in r and r["impl"].startswith("torch-")
                 and r["algorithm"] == algorithm]
        return min(times) if times else None

    for row in rows:
        if "time_s" not in row:
            continue
        for key, algorithm in (("vs_fastest_torch", BASELINE[row["algorithm"]]),
                               ("vs_torch_same_algorithm", row["algorithm"])):
            base = fastest_torch(algorithm)
            row[key] = row["time_s"]["median"] / base if base else None


def plot(result: dict, path) -> None:
    from bench.plots import plot_bars

    rows = [r for r in result["results"] if "time_s" in r]
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    panels, labels = [], None
    for name in sets:
        mine = [r for r in rows if r["param_set"] == name]
        labels = labels or [f"{r['algorithm']}[{r['impl']}]" for r in mine]
        by_label = {f"{r['algorithm']}[{r['impl']}]": r for r in mine}
        panels.append((f"{name}: step [ms]", [1e3 * by_label[lbl]["time_s"]["median"]
                                              if lbl in by_label else 0.0 for lbl in labels], None))
    title = f"{result['device']['name']} ({result['config']['dtype']}, torch {result['versions']['torch']})"
    plot_bars(panels, labels or [], path, title, log=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench/micro.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sets and few repeats (minutes on a CPU)")
    p.add_argument("--param-sets", help=f"comma-separated, from {', '.join(MODEL_SETS)}; "
                   "'none' for the synthetic sweep alone")
    p.add_argument("--sweep-totals", help="synthetic sets: total elements, comma-separated (e.g. 1M,16M); "
                   "'none' for the model sets alone")
    p.add_argument("--sweep-tensors", help="synthetic sets: numbers of tensors, comma-separated")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--only", help="time only the cases whose label contains one of these "
                                  "comma-separated texts (e.g. 'sam[,sgd[torch-fused]')")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip launch counts")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--out", help="JSON path (the PNG goes beside it); default runs/micro-<machine>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    names = [n for n in args.param_sets.split(",") if n != "none"] if args.param_sets else (
        ["wrn-16-4", "resnet50"] if args.quick else list(MODEL_SETS))
    for name in names:
        if name not in MODEL_SETS:
            p.error(f"--param-sets: unknown set {name!r}; choose from {', '.join(MODEL_SETS)}")
    totals = _sizes(p, args.sweep_totals, "4M" if args.quick else ("1M,16M,64M" if on_gpu else "1M,8M"))
    counts = _sizes(p, args.sweep_tensors, "1,64,512" if args.quick else "1,16,256,1024")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (
        (100 if on_gpu else 5) if args.quick else (300 if on_gpu else 15))
    dtype = getattr(torch, args.dtype)
    all_cases, unavailable = cases(device)
    if args.only:
        wanted = args.only.split(",")
        all_cases = [c for c in all_cases if any(text in c.label for text in wanted)]
    copy_numel = 64 << 20  # 256 MiB each way: larger than any cache
    copy_bps = copy_bandwidth(device, copy_numel, args.warmup, max(args.repeats, 10))
    print(f"copy bandwidth: {copy_bps / 1e9:.2f} GB/s; unavailable backends: "
          + (", ".join(f"{k} ({v})" for k, v in unavailable.items()) or "none"), flush=True)
    config = {"quick": args.quick, "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats,
              "param_sets": names, "sweep_totals": totals, "sweep_tensors": counts,
              "threads": torch.get_num_threads(), "copy_bandwidth_numel": copy_numel}
    result = provenance.header(device, config, SCHEMA)
    result.update({"copy_bandwidth_gbps": copy_bps / 1e9, "unavailable_backends": unavailable,
                   "traffic_passes": {k: dict(zip(("params", "grads", "state"), v)) for k, v in TRAFFIC.items()},
                   "skipped_param_sets": {}, "results": []})
    for set_name, shapes in param_sets(names, totals, counts, result["skipped_param_sets"]).items():
        result["results"] += bench_set(set_name, shapes, all_cases, args, device, dtype, copy_bps)
    out = Path(args.out or provenance.RUNS / f"micro-{provenance.machine_tag(device)}"
                                             f"{'-quick' if args.quick else ''}.json")
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def _sizes(parser, text: str, default: str) -> list:
    if text == "none":
        return []
    out = []
    for item in (text or default).split(","):
        item = item.strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(item[-1:].upper(), 1)
        digits = item[:-1] if mult > 1 else item
        if not digits.isdigit() or int(digits) < 1:
            parser.error(f"not a positive size: {item!r} (use e.g. 4096, 64K, 16M)")
        out.append(int(digits) * mult)
    return out


if __name__ == "__main__":
    main()
