"""MSAM and SAM on PyTorch's distributed engines: DDP and sharded state (FSDP2).

* DDP: the gradients are all-reduced by DDP, the optimizer step is replicated and stays
  bit-identical on every rank (:func:`check_replicas_identical` verifies it).
* SAM under DDP: :func:`sam_step` runs both passes, with a local (default) or global ascent.
* FSDP2 (``fully_shard``): parameters are DTensor shards; the optimizers detect them and
  all-reduce the partial sums of squares once per step (``sharding``).
* :func:`unperturbed`: evaluate MSAM's true weights under FSDP2 (resharding around it).
* :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.distributed.checkpoint``.

See docs/distributed.md.
"""

from msam_fused.distributed import sharding
from msam_fused.distributed.checkpoint import load_checkpoint, save_checkpoint
from msam_fused.distributed.fsdp import unperturbed
from msam_fused.distributed.replicas import check_replicas_identical
from msam_fused.distributed.sam_step import ASCENTS, DEFAULT_ASCENT, sam_step

__all__ = ["sam_step", "ASCENTS", "DEFAULT_ASCENT", "check_replicas_identical", "unperturbed",
           "save_checkpoint", "load_checkpoint", "sharding"]
