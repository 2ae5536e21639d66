"""Layers: ghost batch normalization, masked dense/conv layers and SWAT."""

from jaxddp.nn.ghost_batch_norm import GhostBatchNorm
from jaxddp.nn.masked import MaskedConv, MaskedDense

__all__ = ["GhostBatchNorm", "MaskedConv", "MaskedDense"]
