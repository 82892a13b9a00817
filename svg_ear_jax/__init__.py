"""svg_ear_jax: SVG-EAR sparse attention (error-aware routing + centroid compensation) in JAX."""

from svg_ear_jax.attention import global_head_ids, resolve_implementation, svg_ear_attention
from svg_ear_jax.config import SvgEarConfig
from svg_ear_jax.dense import dense_attention
from svg_ear_jax.reference import dense_attention_reference
from svg_ear_jax.state import SvgEarAux, SvgEarState

__all__ = [
    "SvgEarAux",
    "SvgEarConfig",
    "SvgEarState",
    "dense_attention",
    "dense_attention_reference",
    "global_head_ids",
    "resolve_implementation",
    "svg_ear_attention",
]
__version__ = "0.1.0"
