"""Pallas GPU kernels (Triton lowering; one Mosaic GPU kernel for Hopper) for SVG-EAR, each
beside a jnp reference.

Imports nothing from svg_ear_jax: kernels take arrays and block sizes.
"""

from pallas_kernels.budget_route import budget_route, budget_route_reference
from pallas_kernels.cluster_moments import (cluster_means, cluster_means_reference,
                                             cluster_moments, cluster_moments_reference)
from pallas_kernels.error_probe import ear_error_probe, ear_error_probe_reference
from pallas_kernels.kmeans_assign import kmeans_assign, kmeans_assign_reference
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference
from pallas_kernels.sparse_attention_mgpu import on_hopper, sparse_attention_mgpu
from pallas_kernels.sparse_layout import padding_waste, sparse_attention_metadata

__all__ = ["budget_route", "budget_route_reference", "cluster_means", "cluster_means_reference",
           "cluster_moments", "cluster_moments_reference", "ear_error_probe",
           "ear_error_probe_reference", "kmeans_assign", "kmeans_assign_reference", "on_hopper",
           "padding_waste", "sparse_attention", "sparse_attention_metadata",
           "sparse_attention_mgpu", "sparse_attention_reference"]
