"""Wan2.2 in flax.nnx: the DiT (T2V-A14B, I2V-A14B, TI2V-5B) with SVG-EAR self-attention,
the Wan2.1 / Wan2.2 VAEs, the UMT5 text encoder and the denoising pipeline.

Checkpoint conversion to Orbax is `models.wan.convert.convert` (CLI: `svg-ear-convert wan`).
"""

from models.wan.config import VARIANTS, WanConfig
from models.wan.convert import from_pretrained
from models.wan.experts import WanExpertPair
from models.wan.pipeline import WAN_NEGATIVE_PROMPT, WanPipeline, WanPipelineOutput
from models.wan.text import encode_prompt
from models.wan.transformer import WanTransformer
from models.wan.umt5 import UMT5Config, UMT5Encoder
from models.wan.vae import WanVAE, WanVAEConfig, WanVAETiling

__all__ = ["VARIANTS", "WAN_NEGATIVE_PROMPT", "UMT5Config", "UMT5Encoder", "WanConfig",
           "WanExpertPair", "WanPipeline", "WanPipelineOutput", "WanTransformer", "WanVAE", "WanVAEConfig", "WanVAETiling",
           "encode_prompt", "from_pretrained"]
