"""Pallas GPU kernels (Triton lowering) for SVG-EAR; each beside a jnp reference.

Imports nothing from svg_ear_jax: kernels take arrays and block sizes.
"""

from pallas_kernels.packed_attention import (packed_metadata, packed_sparse_attention,
                                             packed_sparse_attention_reference, padding_waste)

__all__ = ["packed_metadata", "packed_sparse_attention", "packed_sparse_attention_reference",
           "padding_waste"]
