"""WanTransformer without torch: shapes, dtypes, SVG-EAR inside the model, expert pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import AttentionPolicy
from models.attention import matching_state
from models.wan import VARIANTS, WanConfig, WanExpertPair, WanTransformer
from models.wan.convert import key_table
from svg_ear_jax import SvgEarConfig, SvgEarState
from wan_testing import rel_err, random_jax_model, tiny_config, wan_inputs

EAR_FULL = SvgEarConfig(routing="ear", density=1.0, num_q_clusters=4, num_k_clusters=8,
                        kmeans_iters=4, kmeans_iters_warm=2)


def _jit_forward(model, x, t, ctx):
  return nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))


def test_bf16_keeps_fp32_islands():
  model = random_jax_model("t2v", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  fp32 = {k for k, v in params.items() if v.get_value().dtype == jnp.float32}
  assert fp32 == {k for k in params if k.startswith(("time_embedder", "time_proj"))
                  or "norm" in k or k.endswith("scale_shift_table")}
  assert params["blocks.attn1.to_q.kernel"].get_value().dtype == jnp.bfloat16
  assert params["blocks.attn1.to_q.kernel"].get_value().shape == (2, 32, 32)  # stacked layers

  out = _jit_forward(model, *wan_inputs("t2v"))
  assert out.shape == (1, 4, 3, 16, 16) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_output_shape(kind):
  model = random_jax_model(kind)
  x, t, ctx = wan_inputs(kind, batch=2)
  out = _jit_forward(model, x, t, ctx)
  assert out.shape == (2, model.config.out_channels, *x.shape[2:])
  assert np.isfinite(np.asarray(out)).all()


def test_per_token_timesteps_equal_to_broadcast_scalar():
  model = random_jax_model("ti2v")
  x, _, ctx = wan_inputs("ti2v")
  scalar = _jit_forward(model, x, np.array([700.0], np.float32), ctx)
  per_token = _jit_forward(model, x, np.full((1, 192), 700.0, np.float32), ctx)
  # two different float32 programs (per-token modulation vs one broadcast row): rounding
  # differs by ~2e-5 relative on some CPUs; a broadcasting mistake would be O(1)
  np.testing.assert_allclose(per_token, scalar, rtol=1e-4, atol=1e-4)


def test_rejects_bad_inputs():
  model = random_jax_model("t2v")
  x, t, ctx = wan_inputs("t2v")
  with pytest.raises(ValueError, match="hidden_states must be"):
    model(jnp.asarray(x[:, :3]), t, ctx)
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    model(jnp.asarray(x[..., :15]), t, ctx)
  with pytest.raises(ValueError, match="timestep must be"):
    model(jnp.asarray(x), np.zeros((1, 7), np.float32), ctx)
  with pytest.raises(ValueError, match="encoder_hidden_states must be"):
    model(jnp.asarray(x), t, ctx[..., :8])


def test_svg_ear_dense_routing_is_the_dense_model():
  model = random_jax_model("t2v")
  inputs = wan_inputs("t2v", batch=2)
  dense = np.asarray(_jit_forward(model, *inputs))

  model.set_attention(SvgEarConfig(routing="dense", num_q_clusters=4, num_k_clusters=8))
  routed = np.asarray(_jit_forward(model, *inputs))

  np.testing.assert_array_equal(routed, dense)
  assert model.kmeans_state.get_value() is None  # dense routing computes no centroids


def test_svg_ear_full_density_matches_dense():
  model = random_jax_model("t2v")
  inputs = wan_inputs("t2v")
  dense = np.asarray(_jit_forward(model, *inputs))

  model.set_attention(EAR_FULL)
  sparse = np.asarray(_jit_forward(model, *inputs))

  assert rel_err(sparse, dense) < 1e-4
  np.testing.assert_allclose(np.asarray(model.attention_density.get_value()), 1.0)


def test_kmeans_state_is_carried_between_calls_and_resettable():
  model = random_jax_model("t2v")
  model.set_attention(AttentionPolicy.sparse(EAR_FULL, dense_layers=1))
  forward = nnx.jit(lambda m, *a: m(*a))
  x1, t1, ctx = wan_inputs("t2v", seed=1, timestep=900.0)
  x2, t2, _ = wan_inputs("t2v", seed=2, timestep=800.0)
  assert model.kmeans_state.get_value() is None

  forward(model, x1, t1, ctx)
  first = jax.tree.map(np.asarray, model.kmeans_state.get_value())
  forward(model, x2, t2, ctx)
  second = jax.tree.map(np.asarray, model.kmeans_state.get_value())

  # One sparse layer (the first is dense), batch 1, 2 heads, head dim 16.
  assert first.q_centroids.shape == second.q_centroids.shape == (1, 1, 2, 4, 16)
  assert first.k_centroids.shape == second.k_centroids.shape == (1, 1, 2, 8, 16)
  assert second.q_centroids.dtype == np.float32
  assert not np.allclose(first.q_centroids, second.q_centroids)
  assert not np.allclose(first.k_centroids, second.k_centroids)
  assert model.attention_density.get_value().shape == (1, 1, 2)

  model.reset_attention_state()
  assert model.kmeans_state.get_value() is None


def test_state_that_no_longer_fits_restarts_cold():
  state = SvgEarState(q_centroids=jnp.zeros((1, 1, 2, 4, 16)),
                      k_centroids=jnp.zeros((1, 1, 2, 8, 16)))
  assert matching_state(state, (1, 1, 2, 4, 16), (1, 1, 2, 8, 16)) is state
  assert matching_state(state, (1, 2, 2, 4, 16), (1, 2, 2, 8, 16)) is None  # batch 2
  assert matching_state(state, (1, 1, 2, 4, 16), (1, 1, 2, 16, 16)) is None  # Kk 16
  assert matching_state(None, (1, 1, 2, 4, 16), (1, 1, 2, 8, 16)) is None


def test_attention_policy_coercion():
  assert AttentionPolicy.coerce(None) == AttentionPolicy.coerce("dense") == AttentionPolicy()
  assert AttentionPolicy.coerce(EAR_FULL) == AttentionPolicy(svg_ear=EAR_FULL)
  assert AttentionPolicy(svg_ear=EAR_FULL, dense_layers=5).num_dense(2) == 2
  assert AttentionPolicy().num_dense(40) == 40
  with pytest.raises(TypeError):
    AttentionPolicy.coerce("sparse")
  with pytest.raises(ValueError):
    AttentionPolicy(svg_ear=EAR_FULL, dense_layers=-1)


def test_expert_pair_picks_by_timestep():
  high, low = random_jax_model("t2v", seed=0), random_jax_model("t2v", seed=1)
  pair = WanExpertPair(high, low, boundary_ratio=0.875)
  x, _, ctx = wan_inputs("t2v")

  assert pair.expert_for(875.0) is high and pair.expert_for(np.array([999.0])) is high
  assert pair.expert_for(874.9) is low and pair.expert_for(jnp.array([0.0])) is low
  t = np.array([100.0], np.float32)
  np.testing.assert_array_equal(np.asarray(pair(jnp.asarray(x), t, ctx)),
                                np.asarray(low(jnp.asarray(x), t, ctx)))
  with pytest.raises(ValueError, match="straddle"):
    pair.expert_for(np.array([900.0, 100.0]))
  with pytest.raises(TypeError, match="concrete timestep"):
    jax.jit(lambda t: pair.expert_for(t).config.num_layers)(jnp.array([900.0]))
  with pytest.raises(ValueError, match="share one architecture"):
    WanExpertPair(high, random_jax_model("i2v"), boundary_ratio=0.9)


def test_presets():
  t2v, i2v, ti2v = WanConfig.t2v_a14b(), WanConfig.i2v_a14b(), WanConfig.ti2v_5b()
  assert (t2v.dim, t2v.in_channels, t2v.boundary_ratio) == (5120, 16, 0.875)
  assert (i2v.in_channels, i2v.out_channels, i2v.boundary_ratio) == (36, 16, 0.9)
  assert (ti2v.dim, ti2v.num_layers, ti2v.ffn_dim, ti2v.in_channels) == (3072, 30, 14336, 48)
  assert ti2v.variant_name() == "ti2v-5b" and tiny_config("t2v").variant_name() is None
  assert WanConfig.from_dict(t2v.to_dict()) == t2v



@pytest.mark.parametrize("variant, n_params, n_tensors", [
    ("t2v-a14b", 14_288_491_584, 1095), ("ti2v-5b", 4_999_787_712, 825)])
def test_preset_sizes_match_diffusers(variant, n_params, n_tensors):
  """Counts of diffusers `WanTransformer3DModel` built on the meta device."""
  cfg = VARIANTS[variant]()
  abstract = nnx.eval_shape(lambda: WanTransformer(cfg))
  shapes = [v.get_value().shape for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  assert sum(int(np.prod(s)) for s in shapes) == n_params
  assert len(key_table(cfg)) == n_tensors
