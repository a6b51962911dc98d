"""One optimizer step on the CPU, ResNet-50's parameter set: the fused MSAM step against
torch.optim.SGD(fused=True) and against the per-tensor reference (targets: docs/benchmarks.md).

    python bench/fused_step_cpu.py --out bench/results/cpu_fused_step.json   # default: runs/
    python bench/fused_step_cpu.py --repeats 31 --out /tmp/run.json

Every timing is the median of ``--repeats`` steps. The contenders run round-robin (one step
of each in turn), so a change in the machine's load hits them alike; the JSON keeps every
sample and the load average. It also times the design alternatives of docs/kernels.md: the
fused passes over a pointer table of the 161 tensors against the same passes over one flat
buffer, and what a flat layout costs when gradients must first be gathered into it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import bench/ as a package of the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

import msam_fused
from bench import provenance
from msam_fused import fused_ops, reference

HYPER = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)


def resnet50_shapes():
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def with_grads(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
    return params


def contenders(shapes):
    """name -> a function that runs one step; each owns its own parameters and state."""
    sgd_params, msam_params, ref_params = (with_grads(shapes, seed) for seed in (1, 2, 3))
    sgd = torch.optim.SGD(sgd_params, **HYPER, fused=True)
    msam = msam_fused.MSAM(msam_params, **HYPER, rho=0.5, backend="cpu")
    ref = msam_fused.MSAM(ref_params, **HYPER, rho=0.5, backend="reference")

    # The two fused passes alone, over the table of tensors and over one flat buffer (design (b)
    # against design (a) of docs/kernels.md), and the gather a flat layout needs when the
    # gradients are not views into a flat buffer.
    table = with_grads(shapes, 4)
    table_state = [[p.detach() for p in table], [p.grad for p in table], [torch.zeros_like(p) for p in table]]
    numel = sum(p.numel() for p in table)
    flat = [[torch.randn(numel)], [1e-3 * torch.randn(numel)], [torch.zeros(numel)]]
    flat_grad = torch.empty(numel)
    flat_grad_views = list(flat_grad.split([p.numel() for p in table]))
    grads_1d = [p.grad.view(-1) for p in table]
    coef_old, coef_new = torch.tensor(0.0), torch.tensor(0.01)
    hyper = torch.tensor([HYPER[k] if k in HYPER else 0.5 for k in reference.MSAM_SGD_HYPER], dtype=torch.float64)

    def passes(p, g, v):
        masters = [None] * len(p)
        fused_ops.msam_sgd_partials(p, g, v, masters, hyper=hyper, norm_dtype=torch.float32)
        fused_ops.msam_sgd_step_(p, g, v, masters, hyper=hyper, coef_old=coef_old, coef_new=coef_new)

    return {
        "torch_sgd_fused": sgd.step,
        "msam_fused_cpu": msam.step,
        "msam_reference": ref.step,
        "passes_tensor_table": lambda: passes(*table_state),
        "passes_flat_buffer": lambda: passes(*flat),
        "gather_grads_into_flat_buffer": lambda: torch._foreach_copy_(flat_grad_views, grads_1d),
    }


def measure(steps, repeats, slow, slow_repeats):
    """Round-robin timings: samples[name] = seconds per step."""
    samples = {name: [] for name in steps}
    for fn in steps.values():  # warm-up: state, page faults, thread pool
        fn()
    for r in range(repeats):
        for name, fn in steps.items():
            if name in slow and r >= slow_repeats:
                continue
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") \
        else platform.processor()
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "msam_fused_cpu_kernels": torch.ops.msam_fused.cpu_capability(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per contender (median)")
    parser.add_argument("--reference-repeats", type=int, default=7, help="timed steps of the slow reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=str(provenance.RUNS / "cpu_fused_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = resnet50_shapes()
    steps = contenders(shapes)
    load_before = os.getloadavg()
    samples = measure(steps, args.repeats, {"msam_reference"}, args.reference_repeats)
    load_after = os.getloadavg()
    median = {name: statistics.median(s) for name, s in samples.items()}
    result = {
        "what": "one optimizer step, ResNet-50 parameter set (fp32), CPU; medians of round-robin runs",
        "params": sum(torch.Size(s).numel() for s in shapes), "tensors": len(shapes),
        "hyperparameters": HYPER, "machine": machine(),
        "load_average_before_after": [load_before, load_after],
        "median_ms": {k: round(v * 1e3, 3) for k, v in median.items()},
        "ratios": {
            "msam_fused_cpu / torch_sgd_fused (target <= 1.8)":
                round(median["msam_fused_cpu"] / median["torch_sgd_fused"], 3),
            "msam_reference / msam_fused_cpu (target >= 3)":
                round(median["msam_reference"] / median["msam_fused_cpu"], 3),
            "passes_tensor_table / passes_flat_buffer":
                round(median["passes_tensor_table"] / median["passes_flat_buffer"], 3),
        },
        "samples_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in samples.items()},
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, ms in result["median_ms"].items():
        print(f"{name:32s} {ms:10.2f} ms")
    for name, ratio in result["ratios"].items():
        print(f"{name:50s} {ratio:6.2f}")
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
