"""Keep BatchNorm running statistics out of SAM's second forward pass."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers in training mode normalise with batch statistics but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.

    SAM's second forward pass runs at the ascent point ``w + e``; its batch statistics are
    not the model's, so they must not leak into the running averages. This switches
    ``track_running_stats`` off (rather than setting ``momentum = 0``, which still counts
    the batch and breaks ``momentum=None`` cumulative averaging). Evaluation mode is unaffected.
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True
