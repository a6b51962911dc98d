"""Evaluating MSAM's true weights under FSDP2 without poisoning the next training forward.

FSDP2 keeps the root module's all-gathered (unsharded) parameters after a forward pass, for
the backward it expects; only the backward frees them. An evaluation forward inside
``optimizer.unperturbed()`` therefore leaves the root holding all-gathered copies of the
*true* weights, and the next training forward uses those stale copies instead of gathering
the perturbed shards again: the gradient is taken at the wrong point, silently.
:func:`unperturbed` drops the all-gathered copies on the way in and out.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def unperturbed(model: nn.Module, optimizer) -> Iterator[None]:
    """``optimizer.unperturbed()`` for a model that may be FSDP2-sharded (``fully_shard``).

    Inside, the parameters hold the true weights and a forward pass all-gathers them; on
    exit every FSDP2 module is resharded, so the next forward gathers the perturbed weights.
    For DDP or unsharded models it is exactly ``optimizer.unperturbed()``. Every rank must
    enter it (FSDP2's forward all-gathers).
    """
    reshard(model)
    try:
        with optimizer.unperturbed():
            yield
    finally:
        reshard(model)


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's all-gathered parameters (no-op without FSDP2)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    if module_type is None:
        return
    for module in model.modules():
        if isinstance(module, module_type):
            module.reshard()
