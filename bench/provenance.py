"""Where and with what a benchmark ran: device, versions, date (the header of every JSON)."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

import msam_fused


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


#: Where benchmarks write when no ``--out`` is given: ignored by git. The committed results in
#: bench/results/ are only ever written on purpose, with ``--out`` (docs/benchmarks.md).
RUNS = Path(__file__).resolve().parent.parent / "runs"


def machine_tag(device: torch.device) -> str:
    """A file-name-safe name of the machine, for result file names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def header(device: torch.device, config: dict, schema: str) -> dict:
    versions = {"torch": torch.__version__, "msam_fused": msam_fused.__version__,
                "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {
        "schema": schema,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device), "host": platform.node()},
        "versions": versions,
        "config": config,
    }


def available_backends(device: torch.device) -> dict:
    """msam_fused backends that run on ``device`` (enumerated at run time, "auto" aside), and
    the reason each other one cannot."""
    found = msam_fused.available_backends(device)
    return {name: reason for name, reason in found.items() if name != "auto"}
