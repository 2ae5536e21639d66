"""Layers that any Flax (Linen) model can use."""

from jaxddp.nn.ghost_batch_norm import GhostBatchNorm

__all__ = ["GhostBatchNorm"]
