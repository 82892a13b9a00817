"""HunyuanVideo in flax.nnx: the T2V DiT with SVG-EAR joint attention, the VAE, the text
encoders (LLaVA-Llama-3-8B as an encoder, CLIP-L's text model) and the pipeline.

Checkpoint conversion to Orbax is `models.hunyuan.convert.convert` (CLI: `svg-ear-convert
hunyuan`).
"""

from models.hunyuan.clip import CLIPTextConfig, CLIPTextEncoder, CLIPTextOutput
from models.hunyuan.config import VARIANTS, HunyuanConfig
from models.hunyuan.convert import from_pretrained
from models.hunyuan.llama import LlamaConfig, LlamaEncoder
from models.hunyuan.pipeline import HunyuanVideoPipeline, HunyuanVideoPipelineOutput
from models.hunyuan.text import DEFAULT_PROMPT_TEMPLATE, LLAMA_HIDDEN_STATE, encode_prompt
from models.hunyuan.transformer import HunyuanVideoTransformer
from models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig, HunyuanVAETiling

__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "CLIPTextOutput", "DEFAULT_PROMPT_TEMPLATE",
           "HunyuanConfig", "HunyuanVAE", "HunyuanVAEConfig", "HunyuanVAETiling",
           "HunyuanVideoPipeline", "HunyuanVideoPipelineOutput", "HunyuanVideoTransformer",
           "LLAMA_HIDDEN_STATE", "LlamaConfig", "LlamaEncoder", "VARIANTS", "encode_prompt",
           "from_pretrained"]
