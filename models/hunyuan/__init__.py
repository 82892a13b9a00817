"""HunyuanVideo in flax.nnx: the T2V DiT with SVG-EAR joint attention and the VAE.

Checkpoint conversion to Orbax is `models.hunyuan.convert.convert` (CLI: `svg-ear-convert
hunyuan`).
"""

from models.hunyuan.config import VARIANTS, HunyuanConfig
from models.hunyuan.convert import from_pretrained
from models.hunyuan.transformer import HunyuanVideoTransformer
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig, HunyuanVAETiling

__all__ = ["VARIANTS", "HunyuanConfig", "HunyuanVAE", "HunyuanVAEConfig", "HunyuanVAETiling",
           "HunyuanVideoTransformer", "from_pretrained"]
