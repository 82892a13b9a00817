"""Trailing dense tokens (HunyuanVideo's text) and padded keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svg_ear_jax import SvgEarConfig, svg_ear_attention

pytestmark = pytest.mark.split_cases

B, S, H, D, T = 2, 300, 2, 16, 40
SMALL = dict(num_q_clusters=8, num_k_clusters=16, kmeans_iters=8)


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k, v = (jax.random.normal(kk, (B, S, H, D)) for kk in ks)
  mask = jnp.ones((B, S), bool).at[0, S - 15:].set(False).at[1, S - 3:].set(False)
  return q, k, v, mask


def _masked_dense(q, k, v, mask):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(D)
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v, precision="highest")


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("changes", [dict(routing="dense"), dict(routing="ear", density=1.0),
                                     dict(routing="topp", top_p=1.0)])
def test_full_budget_equals_masked_dense(impl, changes):
  q, k, v, mask = _inputs()
  cfg = SvgEarConfig(implementation=impl, **SMALL, **changes)
  out, aux = svg_ear_attention(q, k, v, cfg, num_dense_tokens=T, key_mask=mask, return_aux=True)
  np.testing.assert_allclose(out, _masked_dense(q, k, v, mask), atol=2e-6)
  np.testing.assert_allclose(aux.density, 1.0, rtol=1e-6)


# Bit-equal on CPU; on a GPU, XLA's segment sums are atomic scatter-adds, so two runs differ
# in the last float32 bit (6e-8 seen on an H200). Junk keys of size 50-99 leaking into any
# softmax would move the output by orders of magnitude more than this.
_RERUN_ATOL = 0.0 if jax.default_backend() == "cpu" else 1e-6


@pytest.mark.parametrize("routing_name", ["ear", "topp"])
def test_text_queries_are_dense_and_padding_is_invisible(routing_name):
  q, k, v, mask = _inputs(1)
  cfg = SvgEarConfig(routing=routing_name, **SMALL)
  out, aux = svg_ear_attention(q, k, v, cfg, num_dense_tokens=T, key_mask=mask, return_aux=True)
  assert float(aux.density.max()) < 0.99
  # text queries attend exactly to every valid key
  np.testing.assert_allclose(out[:, S - T:], _masked_dense(q, k, v, mask)[:, S - T:], atol=2e-6)
  # changing padded keys/values changes nothing at all
  junk = jax.random.normal(jax.random.PRNGKey(7), k.shape) * 50
  pad = ~mask[:, :, None, None]
  out2 = svg_ear_attention(q, jnp.where(pad, junk, k), jnp.where(pad, junk, v), cfg,
                           num_dense_tokens=T, key_mask=mask)
  np.testing.assert_allclose(out2, out, atol=_RERUN_ATOL, rtol=0)


def test_reference_padding_pseudo_token_dilutes_softmax():
  """The reference adds a zero-value pseudo-token of weight (256 - L) * e^0 for the padding
  column; at full budget that already breaks exactness. Ours is exact."""
  q, k, v, mask = _inputs(2)
  cfg = SvgEarConfig(routing="ear", density=1.0, **SMALL)
  ours = svg_ear_attention(q, k, v, cfg, num_dense_tokens=T, key_mask=mask)
  want = _masked_dense(q, k, v, mask)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(D)
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  n_pad = jnp.sum(~mask, axis=1).astype(jnp.float32)[:, None, None, None]
  m = jnp.max(logits, -1, keepdims=True)
  num = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - m), v, precision="highest")
  den = jnp.sum(jnp.exp(logits - m), -1, keepdims=True) + n_pad * jnp.exp(-m)  # e^{0 + log n}
  buggy = num / jnp.transpose(den, (0, 2, 1, 3))
  np.testing.assert_allclose(ours, want, atol=2e-6)
  assert float(jnp.abs(buggy - want).max()) > 1e-3


def test_warm_state_with_dense_tokens_covers_video_only():
  q, k, v, mask = _inputs(3)
  cfg = SvgEarConfig(**SMALL)
  _, aux = svg_ear_attention(q, k, v, cfg, num_dense_tokens=T, key_mask=mask, return_aux=True)
  assert aux.state.k_centroids.shape == (B, H, 16, D)
  out = svg_ear_attention(q, k, v, cfg, state=aux.state, num_dense_tokens=T, key_mask=mask)
  assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))


def test_masked_video_keys_are_excluded():
  q, k, v, _ = _inputs(4)
  mask = jnp.ones((B, S), bool).at[:, 10:30].set(False)  # holes in the clustered part
  cfg = SvgEarConfig(routing="ear", density=1.0, **SMALL)
  out = svg_ear_attention(q, k, v, cfg, key_mask=mask)
  np.testing.assert_allclose(out, _masked_dense(q, k, v, mask), atol=2e-6)
  sparse = SvgEarConfig(routing="ear", **SMALL)
  junk = jnp.where(~mask[:, :, None, None], 99.0, k)
  np.testing.assert_allclose(svg_ear_attention(q, junk, v, sparse, key_mask=mask),
                             svg_ear_attention(q, k, v, sparse, key_mask=mask),
                             atol=_RERUN_ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_dense_tokens=-1), ValueError, "num_dense_tokens"),
    (dict(num_dense_tokens=S), ValueError, "num_dense_tokens"),
    (dict(num_dense_tokens=S - 10), ValueError, "minus num_dense_tokens"),
    (dict(key_mask=jnp.ones((B, S - 1), bool)), ValueError, "key_mask must be"),
    (dict(key_mask=jnp.ones((B, S), jnp.int32)), TypeError, "key_mask must be bool"),
])
def test_bad_dense_token_arguments(kwargs, exc, match):
  q, k, v, _ = _inputs()
  with pytest.raises(exc, match=match):
    svg_ear_attention(q, k, v, SvgEarConfig(**SMALL), **kwargs)
