"""Host time of one optimizer step with many tiny tensors (CPU, one thread): what the Python
side of a step costs, next to torch's fused optimizers. With tensors of a few elements the
kernels' work is negligible, so the time per step is the host path: building (or reusing) the
buckets, the backend calls, their argument handling. On a GPU this time is exposed on small
and medium models.

    python bench/host_overhead.py                          # backend "cpu", 1000 and 160 tensors
    python bench/host_overhead.py --backend reference --out /tmp/ref.json

Contenders: MSAM against ``torch.optim.SGD(momentum=0.9, fused=True)`` and AdamW-MSAM against
``torch.optim.AdamW(fused=True)``, each on its own parameters. They run interleaved (one step
of each in turn, ``--repeats`` times) so that a change in the machine's load hits them alike;
the JSON keeps the medians, the ratios and the goals (docs/design.md, "The host path").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msam_fused  # noqa: E402
from bench import provenance  # noqa: E402

TENSOR_COUNTS = (1000, 160)
NUMEL = 4  # elements per tensor: host time dominates
GOALS = {"msam / torch_sgd_fused": 1.3, "adamw_msam / torch_adamw_fused": 1.1}


def params_with_grads(count: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(NUMEL, generator=gen).requires_grad_() for _ in range(count)]
    for p in params:
        p.grad = 1e-3 * torch.randn(NUMEL, generator=gen)
    return params


def contenders(count: int, backend: str) -> dict:
    """name -> one step; each owns its parameters and state. The gradients stay in place, as
    after a backward that accumulated into them."""
    sgd = torch.optim.SGD(params_with_grads(count, 1), lr=0.01, momentum=0.9, fused=True)
    msam = msam_fused.MSAM(params_with_grads(count, 2), lr=0.01, momentum=0.9, rho=0.5, backend=backend)
    adamw = torch.optim.AdamW(params_with_grads(count, 3), lr=1e-3, fused=True)
    adamw_msam = msam_fused.AdamWMSAM(params_with_grads(count, 4), lr=1e-3, rho=0.5, backend=backend)
    return {"torch_sgd_fused": sgd.step, "msam": msam.step,
            "torch_adamw_fused": adamw.step, "adamw_msam": adamw_msam.step}


def measure(steps: dict, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", help="msam_fused backend (default: cpu, the fused C++ one)")
    parser.add_argument("--repeats", type=int, default=300, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "host-overhead-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    result = provenance.header(device, {"backend": args.backend, "repeats": args.repeats, "warmup": args.warmup,
                                        "numel_per_tensor": NUMEL, "threads": 1}, "host-overhead/1")
    result["load_average_before"] = os.getloadavg()
    runs = {}
    for count in TENSOR_COUNTS:
        samples = measure(contenders(count, args.backend), args.repeats, args.warmup)
        median_us = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
        ratios = {"msam / torch_sgd_fused": median_us["msam"] / median_us["torch_sgd_fused"],
                  "adamw_msam / torch_adamw_fused": median_us["adamw_msam"] / median_us["torch_adamw_fused"]}
        runs[str(count)] = {
            "median_us": {k: round(v, 1) for k, v in median_us.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "goal_met": {k: ratios[k] <= goal for k, goal in GOALS.items()},
        }
        print(f"{count} tensors ({args.backend}): "
              + ", ".join(f"{k} {v:.0f} us" for k, v in median_us.items())
              + " | " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    result["load_average_after"] = os.getloadavg()
    result["goals"] = GOALS
    result["tensors"] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
