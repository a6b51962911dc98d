"""Crash-safe checkpoints: a file is either the old complete checkpoint or the new one.

Writing goes to a temporary file in the same directory, is flushed to disk, and then renamed
over the target (``os.replace`` is atomic on POSIX), so a process killed at any moment, even
halfway through a save, leaves the last complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch


def write_atomic(path, write) -> None:
    """Call ``write(file)`` on a temporary file, then move it to ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_orphans(path: Path) -> None:
    """Delete the temporary files of writers of ``path`` that were killed mid-write (their
    process is gone); those of live writers stay."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def save(obj: dict, path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def load(path, device) -> dict:
    # Our own files, holding Python and NumPy RNG states besides tensors: not weights-only.
    return torch.load(path, map_location=device, weights_only=False)


def write_json(path, obj) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
