"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) that resume exactly.

DCP's state-dict functions (``get_state_dict`` / ``set_state_dict``) give an optimizer that
has no state yet one by stepping it with zero gradients and ``lr = 0``. For MSAM that step is
not harmless: the weight decay makes the momentum non-zero, and the parameters get perturbed
along it. For SAM it fails (``SAM.step()`` needs a closure). These helpers avoid both: MSAM
gets zero state directly, SAM goes through its base optimizer (whose groups carry ``rho``).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def save_checkpoint(checkpoint_id: Any, model: nn.Module, optimizer) -> None:
    """Save model and optimizer with DCP: every rank writes its own shards to ``checkpoint_id``
    (a directory every rank can reach). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _dcp_optimizer(optimizer))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=checkpoint_id)


def load_checkpoint(checkpoint_id: Any, model: nn.Module, optimizer) -> None:
    """Load what :func:`save_checkpoint` saved into the (fresh or used) model and optimizer,
    sharded the same way or differently (DCP reshards). Every rank must call it; the run
    then continues exactly as if it had never stopped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from msam_fused.momentum_ascent import MomentumAscentOptimizer

    target = _dcp_optimizer(optimizer)
    if isinstance(target, MomentumAscentOptimizer) and not target.state:
        _create_state(target)
    model_sd, optim_sd = get_state_dict(model, target)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, target, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _dcp_optimizer(optimizer):
    from msam_fused.sam import SAM  # not at import time: msam_fused.sam imports this package

    return optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer


def _create_state(optimizer) -> None:
    """Zero state for every trainable parameter (the keys DCP's zero-gradient step would
    create), so that step never runs."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer.state[p] = optimizer._init_state(p, group)
