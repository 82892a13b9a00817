"""Flax (nnx) ports of video diffusion transformers with SVG-EAR self-attention."""

from models.attention import AttentionPolicy, KMeansState
from models.convert_common import CheckpointError

__all__ = ["AttentionPolicy", "CheckpointError", "KMeansState"]
