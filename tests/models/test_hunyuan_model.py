"""HunyuanVideoTransformer without torch: shapes, dtypes, SVG-EAR joint attention inside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hunyuan_testing import (NUM_VIDEO, hunyuan_inputs, is_fp32_island, jit_forward,
                             random_jax_model, rel_err, tiny_config)
from models import AttentionPolicy
from models.hunyuan import VARIANTS, HunyuanConfig, HunyuanVideoTransformer
from models.hunyuan import joint_attention as ja
from models.hunyuan.convert import key_table
from svg_ear_jax import SvgEarConfig

EAR = dict(routing="ear", num_q_clusters=4, num_k_clusters=8, kmeans_iters=4,
           kmeans_iters_warm=2)
EAR_FULL = SvgEarConfig(density=1.0, **EAR)
EAR_HALF = SvgEarConfig(density=0.5, **EAR)  # really sparse: compensation at work


def test_bf16_keeps_fp32_islands():
  model = random_jax_model(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  fp32 = {k for k, v in params.items() if v.get_value().dtype == jnp.float32}
  assert fp32 == {k for k in params if is_fp32_island(k)}
  assert {"transformer_blocks.attn.norm_added_q.scale", "text_embedder.linear_1.kernel",
          "context_embedder.refiner_blocks.norm1.bias"} <= fp32
  assert params["transformer_blocks.norm1.linear.kernel"].get_value().dtype == jnp.bfloat16
  assert params["single_transformer_blocks.proj_out.kernel"].get_value().shape == (2, 120, 24)

  out = jit_forward(model, hunyuan_inputs(batch=2))
  assert out.shape == (2, 4, 3, 16, 16) and out.dtype == jnp.bfloat16
  assert np.isfinite(out.astype(np.float32)).all()


def test_without_guidance_embedding():
  model = random_jax_model(guidance_embeds=False)
  *inputs, guidance = hunyuan_inputs()
  assert model.guidance_embedder is None
  assert jit_forward(model, inputs).shape == (1, 4, 3, 16, 16)
  with pytest.raises(ValueError, match="no guidance embedding"):
    model(*inputs, guidance)


def test_rejects_bad_inputs():
  model = random_jax_model()
  x, t, text, mask, pooled, g = hunyuan_inputs()
  with pytest.raises(ValueError, match="hidden_states must be"):
    model(x[:, :3], t, text, mask, pooled, g)
  with pytest.raises(ValueError, match="not a multiple of the patch size 2"):
    model(x[..., :15], t, text, mask, pooled, g)
  with pytest.raises(ValueError, match="encoder_attention_mask"):
    model(x, t, text, mask[:, :5], pooled, g)
  with pytest.raises(ValueError, match="pooled_projections must have shape"):
    model(x, t, text, mask, pooled[:, :4], g)
  with pytest.raises(ValueError, match="guidance must be given"):
    model(x, t, text, mask, pooled)
  with pytest.raises(ValueError, match="timestep must have shape"):
    model(x, np.zeros((1, 2), np.float32), text, mask, pooled, g)


def test_joint_key_mask_reads_the_text_mask_as_a_count():
  """As diffusers and the original (`cu_seqlens`): valid keys are the first L_v + n."""
  kv_len = ja.joint_key_lengths(3, jnp.array([[1, 1, 0, 0], [1, 0, 1, 0]]))
  np.testing.assert_array_equal(kv_len, [5, 5])
  np.testing.assert_array_equal(ja.joint_key_mask(kv_len, 7)[0], [1, 1, 1, 1, 1, 0, 0])


def test_svg_ear_dense_routing_is_the_dense_model():
  model = random_jax_model()
  inputs = hunyuan_inputs(batch=2)
  dense = jit_forward(model, inputs)

  model.set_attention(SvgEarConfig(routing="dense", num_q_clusters=4, num_k_clusters=8))
  routed = jit_forward(model, inputs)

  # Same masked softmax, computed by svg_ear_attention's chunked path: float32 rounding only.
  assert rel_err(routed, dense) < 1e-5
  assert model.kmeans_state.get_value() is None  # dense routing computes no centroids
  np.testing.assert_array_equal(model.attention_density.get_value(), np.ones((4, 2, 2)))


def test_svg_ear_full_density_matches_dense():
  model = random_jax_model()
  inputs = hunyuan_inputs(batch=2)
  dense = jit_forward(model, inputs)

  model.set_attention(EAR_FULL)
  sparse = jit_forward(model, inputs)

  assert rel_err(sparse, dense) < 1e-4
  np.testing.assert_allclose(np.asarray(model.attention_density.get_value()), 1.0)


@pytest.mark.parametrize("attention", [None, EAR_HALF], ids=["dense", "svg_ear_sparse"])
def test_padding_tokens_never_influence_the_output(attention):
  model = random_jax_model(attention=attention)
  x, t, text, mask, pooled, g = hunyuan_inputs(batch=2)
  other = text.copy()
  other[mask == 0] = np.random.default_rng(7).standard_normal(((mask == 0).sum(), 16)) * 5

  out = jit_forward(model, (x, t, text, mask, pooled, g))
  model.reset_attention_state()  # same cold k-means start for both
  out_other = jit_forward(model, (x, t, other, mask, pooled, g))

  np.testing.assert_array_equal(out_other, out)
  if attention is not None:
    density = np.asarray(model.attention_density.get_value())
    assert density.shape == (4, 2, 2) and (density < 0.95).all()
  # The prompt tokens do matter.
  changed = text.copy()
  changed[0, 0] += 1.0
  model.reset_attention_state()
  assert not np.allclose(jit_forward(model, (x, t, changed, mask, pooled, g))[0], out[0])


def test_kmeans_state_is_carried_between_calls_and_resettable():
  model = random_jax_model(attention=AttentionPolicy.sparse(EAR_HALF, dense_layers=1))
  x1, t1, text, mask, pooled, g = hunyuan_inputs(seed=1, timestep=900.0)
  x2, t2, *_ = hunyuan_inputs(seed=2, timestep=800.0)
  assert model.kmeans_state.get_value() is None

  jit_forward(model, (x1, t1, text, mask, pooled, g))
  first = jax.tree.map(np.asarray, model.kmeans_state.get_value())
  jit_forward(model, (x2, t2, text, mask, pooled, g))
  second = jax.tree.map(np.asarray, model.kmeans_state.get_value())

  # 3 sparse layers (double block 0 is dense): double 1, single 0, single 1; batch 1,
  # 2 heads of 12, centroids of the 192 video tokens only.
  assert first.q_centroids.shape == second.q_centroids.shape == (3, 1, 2, 4, 12)
  assert first.k_centroids.shape == second.k_centroids.shape == (3, 1, 2, 8, 12)
  assert second.q_centroids.dtype == np.float32
  assert not np.allclose(first.q_centroids, second.q_centroids)
  assert not np.allclose(first.k_centroids, second.k_centroids)
  assert model.attention_density.get_value().shape == (3, 1, 2)

  model.reset_attention_state()
  assert model.kmeans_state.get_value() is None


def test_dense_layers_reach_into_the_single_blocks():
  model = random_jax_model(attention=AttentionPolicy.sparse(EAR_FULL, dense_layers=3))
  inputs = hunyuan_inputs()
  dense = jit_forward(random_jax_model(), inputs)

  out = jit_forward(model, inputs)

  # Double blocks 0, 1 and single block 0 dense: only single block 1 is sparse.
  assert model.kmeans_state.get_value().q_centroids.shape == (1, 1, 2, 4, 12)
  assert rel_err(out, dense) < 1e-4


def test_presets():
  cfg = HunyuanConfig.t2v_720p()
  assert (cfg.dim, cfg.mlp_dim, cfg.num_joint_layers) == (3072, 12288, 60)
  assert (cfg.rope_axes_dim, cfg.rope_theta, cfg.guidance_embeds) == ((16, 56, 56), 256.0, True)
  assert cfg.param_dtype == jnp.bfloat16
  assert cfg.variant_name() == "t2v-720p" and tiny_config().variant_name() is None
  assert HunyuanConfig.from_dict(cfg.to_dict()) == cfg
  assert HunyuanConfig.from_diffusers_config({}) == cfg
  with pytest.raises(ValueError, match="rope_axes_dim"):
    tiny_config(rope_axes_dim=(4, 4, 6))
  with pytest.raises(ValueError, match="token_replace"):
    HunyuanConfig.from_diffusers_config({"image_condition_type": "token_replace"})


def test_preset_size_matches_diffusers():
  """Counts of diffusers `HunyuanVideoTransformer3DModel()` built on the meta device."""
  cfg = VARIANTS["t2v-720p"]()
  abstract = nnx.eval_shape(lambda: HunyuanVideoTransformer(cfg))
  shapes = [v.get_value().shape for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  assert sum(int(np.prod(s)) for s in shapes) == 12_821_012_544
  assert len(key_table(cfg)) == 1264
  assert NUM_VIDEO == 192
