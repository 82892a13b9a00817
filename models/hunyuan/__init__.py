"""HunyuanVideo T2V DiT in flax.nnx, with SVG-EAR joint attention.

Checkpoint conversion to Orbax is `models.hunyuan.convert.convert` (CLI: `svg-ear-convert
hunyuan`).
"""

from models.hunyuan.config import VARIANTS, HunyuanConfig
from models.hunyuan.convert import from_pretrained
from models.hunyuan.transformer import HunyuanVideoTransformer

__all__ = ["VARIANTS", "HunyuanConfig", "HunyuanVideoTransformer", "from_pretrained"]
