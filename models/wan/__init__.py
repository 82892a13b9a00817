"""Wan2.2 DiT (T2V-A14B, I2V-A14B, TI2V-5B) in flax.nnx, with SVG-EAR self-attention.

Checkpoint conversion to Orbax is `models.wan.convert.convert` (CLI: `svg-ear-convert wan`).
"""

from models.wan.config import VARIANTS, WanConfig
from models.wan.convert import from_pretrained
from models.wan.experts import WanExpertPair
from models.wan.transformer import WanTransformer

__all__ = ["VARIANTS", "WanConfig", "WanExpertPair", "WanTransformer", "from_pretrained"]
