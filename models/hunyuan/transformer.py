"""HunyuanVideo DiT (`HunyuanVideoTransformer`) in flax.nnx, mirroring diffusers
`HunyuanVideoTransformer3DModel` (text-to-video; no token-replace image conditioning)."""

import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers, parallel
from models.attention import (AttentionDensity, AttentionLike, AttentionPolicy, KMeansState,
                              SparseAttentionMixin, matching_state)
from models.hunyuan import joint_attention as ja
from models.hunyuan.config import HunyuanConfig

Rope = Tuple[jax.Array, jax.Array]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
F32 = jnp.float32


def timestep_embedding(t: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
  """Sinusoid `[cos, sin]` of diffusers `Timesteps(dim, flip_sin_to_cos=True, 0)`, float32.

  Same as `models.layers.timestep_embedding` except that the frequencies are a NumPy
  constant: the reference's float32 exponents, exponentiated exactly and rounded. XLA's
  float32 `exp` is 1 ulp away from torch's on some of them, and guidance values of ~6000
  turn that into phase errors of ~2e-4 (tiny-model parity vs diffusers: 4.7e-5 relative
  error with XLA's `exp`, 1.8e-5 with this table).

  Args:
    t: [N] timesteps (any real dtype).
    dim: even embedding width.

  Returns:
    [N, dim] float32.
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(F32)[:, None] * jnp.asarray(freqs)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:  # [B, L, H*Dh] -> [B, L, H, Dh]
  return x.reshape(*x.shape[:2], num_heads, -1)


def _merge_heads(x: jax.Array) -> jax.Array:  # [B, L, H, Dh] -> [B, L, H*Dh]
  return x.reshape(*x.shape[:2], -1)


def _gated_add(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
  """x + gate * y computed in float32, returned in x.dtype."""
  return (x.astype(F32) + y.astype(F32) * gate).astype(x.dtype)


class AdaModulation(nnx.Module):
  """adaLN parameters `Linear(SiLU(temb))` split into `n` vectors (shift / scale / gate)."""

  def __init__(self, dim: int, n: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    self.n = n
    self.dtype = dtype
    self.linear = layers.linear(dim, n * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, temb: jax.Array) -> jax.Array:  # [B, D] f32 -> [B, n, 1, D] f32
    out = self.linear(jax.nn.silu(temb).astype(self.dtype)).astype(F32)
    return out.reshape(out.shape[0], self.n, 1, -1)


def _rope_video(x: jax.Array, rope: Rope, num_video: int) -> jax.Array:
  """RoPE on the first `num_video` tokens of [B, S, H, Dh]; the text tokens are left as is."""
  if num_video == x.shape[1]:
    return layers.apply_rope(x, *rope)
  return jnp.concatenate([layers.apply_rope(x[:, :num_video], *rope), x[:, num_video:]], axis=1)


class JointAttention(nnx.Module):
  """Double-stream attention: separate video / text projections and per-head RMSNorms, one
  attention over [video | text] (`attention_fn`), separate output projections."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d, dh = cfg.dim, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.to_q, self.to_k, self.to_v = (layers.linear(d, d, **kw) for _ in range(3))
    self.to_out = layers.linear(d, d, **kw)
    self.add_q_proj, self.add_k_proj, self.add_v_proj = (layers.linear(d, d, **kw)
                                                         for _ in range(3))
    self.to_add_out = layers.linear(d, d, **kw)
    self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
        layers.RMSNorm(dh, eps=cfg.eps) for _ in range(4))

  def __call__(self, x: jax.Array, ctx: jax.Array, rope: Rope,
               attention_fn: AttentionFn) -> Tuple[jax.Array, jax.Array]:
    """x: [B, L_v, D] video, ctx: [B, L_t, D] text -> (video out, text out)."""
    h = self.num_heads
    q = layers.apply_rope(self.norm_q(_heads(self.to_q(x), h)), *rope)
    k = layers.apply_rope(self.norm_k(_heads(self.to_k(x), h)), *rope)
    v = _heads(self.to_v(x), h)
    tq = self.norm_added_q(_heads(self.add_q_proj(ctx), h))
    tk = self.norm_added_k(_heads(self.add_k_proj(ctx), h))
    tv = _heads(self.add_v_proj(ctx), h)
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    out = attention_fn(cat(q, tq), cat(k, tk), cat(v, tv))
    num_video = x.shape[1]
    return (self.to_out(_merge_heads(out[:, :num_video])),
            self.to_add_out(_merge_heads(out[:, num_video:])))


class DoubleStreamBlock(nnx.Module):
  """adaLN-Zero on each stream, joint attention, gated feed-forward per stream."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm1 = AdaModulation(d, 6, **kw)
    self.norm1_context = AdaModulation(d, 6, **kw)
    self.attn = JointAttention(cfg, rngs=rngs)
    self.ff = layers.MLP(d, cfg.mlp_dim, d, activation="gelu_tanh", **kw)
    self.ff_context = layers.MLP(d, cfg.mlp_dim, d, activation="gelu_tanh", **kw)
    self.ln = layers.LayerNorm(d, eps=cfg.eps)
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array, ctx: jax.Array, temb: jax.Array, rope: Rope,
               attention_fn: AttentionFn) -> Tuple[jax.Array, jax.Array]:
    """x: [B, L_v, D], ctx: [B, L_t, D], temb: [B, D] f32 -> updated (x, ctx)."""
    # Rows: shift, scale, gate (attention), shift, scale, gate (feed-forward).
    m, c = self.norm1(temb), self.norm1_context(temb)
    h = layers.modulate(self.ln(x), m[:, 0], m[:, 1]).astype(self.dtype)
    hc = layers.modulate(self.ln(ctx), c[:, 0], c[:, 1]).astype(self.dtype)
    attn, attn_ctx = self.attn(h, hc, rope, attention_fn)
    x = _gated_add(x, attn, m[:, 2])
    ctx = _gated_add(ctx, attn_ctx, c[:, 2])
    h = layers.modulate(self.ln(x), m[:, 3], m[:, 4]).astype(self.dtype)
    hc = layers.modulate(self.ln(ctx), c[:, 3], c[:, 4]).astype(self.dtype)
    return _gated_add(x, self.ff(h), m[:, 5]), _gated_add(ctx, self.ff_context(hc), c[:, 5])


class SingleAttention(nnx.Module):
  """q/k/v projections with per-head RMSNorm of a single-stream block (no output proj)."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.to_q, self.to_k, self.to_v = (layers.linear(d, d, **kw) for _ in range(3))
    self.norm_q = layers.RMSNorm(cfg.head_dim, eps=cfg.eps)
    self.norm_k = layers.RMSNorm(cfg.head_dim, eps=cfg.eps)

  def __call__(self, x: jax.Array, num_video: int, rope: Rope,
               attention_fn: AttentionFn) -> jax.Array:
    """x: [B, S, D] as [video | text] -> [B, S, D] attention output (heads merged)."""
    h = self.num_heads
    q = _rope_video(self.norm_q(_heads(self.to_q(x), h)), rope, num_video)
    k = _rope_video(self.norm_k(_heads(self.to_k(x), h)), rope, num_video)
    return _merge_heads(attention_fn(q, k, _heads(self.to_v(x), h)))


class SingleStreamBlock(nnx.Module):
  """adaLN-Zero, then attention and a GELU MLP in parallel, fused by one output proj."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm = AdaModulation(d, 3, **kw)
    self.attn = SingleAttention(cfg, rngs=rngs)
    self.proj_mlp = layers.linear(d, cfg.mlp_dim, **kw)
    self.proj_out = layers.linear(d + cfg.mlp_dim, d, **kw)
    self.ln = layers.LayerNorm(d, eps=cfg.eps)
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array, num_video: int, temb: jax.Array, rope: Rope,
               attention_fn: AttentionFn) -> jax.Array:
    """x: [B, S, D] as [video | text]; temb: [B, D] f32 -> [B, S, D]."""
    m = self.norm(temb)  # shift, scale, gate
    h = layers.modulate(self.ln(x), m[:, 0], m[:, 1]).astype(self.dtype)
    mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
    attn = self.attn(h, num_video, rope, attention_fn)
    return _gated_add(x, self.proj_out(jnp.concatenate([attn, mlp], axis=-1)), m[:, 2])


class RefinerAttention(nnx.Module):
  """Plain multi-head self-attention with biases and no q/k norm."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.to_q, self.to_k, self.to_v = (layers.linear(d, d, **kw) for _ in range(3))
    self.to_out = layers.linear(d, d, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask: [B, L, L] bool -> [B, L, D]."""
    h = self.num_heads
    q, k, v = (_heads(proj(x), h) for proj in (self.to_q, self.to_k, self.to_v))
    return self.to_out(_merge_heads(ja.refiner_attention(q, k, v, mask)))


class RefinerBlock(nnx.Module):
  """Token-refiner block: affine LayerNorms, dense masked attention, SiLU MLP, gates."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(d, eps=cfg.eps, affine=True)
    self.attn = RefinerAttention(cfg, rngs=rngs)
    self.norm2 = layers.LayerNorm(d, eps=cfg.eps, affine=True)
    self.ff = layers.MLP(d, cfg.mlp_dim, d, activation="silu", **kw)
    self.norm_out = AdaModulation(d, 2, **kw)  # gate_msa, gate_mlp
    self.dtype = cfg.dtype

  def __call__(self, x: jax.Array, temb: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; temb: [B, D] f32; mask: [B, L, L] bool -> [B, L, D]."""
    gates = self.norm_out(temb)
    x = _gated_add(x, self.attn(self.norm1(x).astype(self.dtype), mask), gates[:, 0])
    return _gated_add(x, self.ff(self.norm2(x).astype(self.dtype)), gates[:, 1])


def _stack(cfg: HunyuanConfig, block_cls, num: int, rngs: nnx.Rngs):
  """`num` blocks with every Param stacked on a leading [num] axis (run with lax.scan)."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return block_cls(cfg, rngs=rngs)

  return make(rngs)


def _scan(blocks: Any, start: int, stop: int, carry: Any, step: Callable,
          xs: Any = None, gather: Optional[Callable] = None) -> Tuple[Any, Any]:
  """lax.scan of `step(block_i, carry, xs_i) -> (carry, y_i)` over layers [start, stop) of
  a stacked module (or its `nnx.split` (graphdef, params)); the body indexes layer i's
  weights, so no slice of the stack is copied. `gather` maps one layer's weights before
  use (the FSDP all-gather of the sequence-parallel path)."""
  graphdef, params = blocks if isinstance(blocks, tuple) else nnx.split(blocks)

  def body(carry, inputs):
    i, x_i = inputs
    layer = jax.tree.map(lambda a: a[i], params)
    if gather is not None:
      layer = gather(layer)
    block = nnx.merge(graphdef, layer)
    return step(block, carry, x_i)

  return jax.lax.scan(body, carry, (jnp.arange(start, stop), xs))


class TokenRefiner(nnx.Module):
  """`context_embedder`: text states -> refined text tokens, conditioned on t and the
  masked mean of the text."""

  def __init__(self, cfg: HunyuanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    f32 = dict(dtype=F32, param_dtype=F32, rngs=rngs)
    self.config = cfg
    self.timestep_embedder = layers.MLP(cfg.freq_dim, d, d, activation="silu", **f32)
    self.text_embedder = layers.MLP(cfg.text_dim, d, d, activation="silu", **f32)
    self.proj_in = layers.linear(cfg.text_dim, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 rngs=rngs)
    self.refiner_blocks = _stack(cfg, RefinerBlock, cfg.num_refiner_layers, rngs)

  def __call__(self, text: jax.Array, timestep: jax.Array, mask: jax.Array) -> jax.Array:
    """text: [B, L, text_dim]; timestep: [B]; mask: [B, L] (1 = token) -> [B, L, D]."""
    cfg = self.config
    valid = mask.astype(bool)
    weights = valid.astype(F32)[..., None]
    # max(., 1): an all-padding prompt pools to zeros instead of NaN.
    pooled = jnp.sum(text.astype(F32) * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0)
    temb = (self.timestep_embedder(timestep_embedding(timestep, cfg.freq_dim))
            + self.text_embedder(pooled))
    # Pairwise mask; key 0 always visible so that padded query rows are not empty.
    pair = (valid[:, :, None] & valid[:, None, :]).at[:, :, 0].set(True)
    x = self.proj_in(text.astype(cfg.dtype))
    x, _ = _scan(self.refiner_blocks, 0, cfg.num_refiner_layers, x,
                 lambda block, x, _: (block(x, temb, pair), None))
    return x


class HunyuanVideoTransformer(SparseAttentionMixin, parallel.SequenceParallelMixin,
                              nnx.Module):
  """HunyuanVideo DiT: `[B, C, F, H, W]` noisy latents -> `[B, C_out, F, H, W]` prediction.

  20 double-stream blocks (video and text streams with their own weights, one joint
  attention), 40 single-stream blocks over [video | text], a 2-block text token refiner,
  timestep + guidance + pooled-CLIP conditioning, 3-D RoPE (16, 56, 56) / theta 256 on
  the video tokens only, per-head q/k RMSNorm.

  Float32 islands: every LayerNorm / RMSNorm and RoPE rotation, the timestep / guidance
  sinusoids and the small conditioning embedders (time, guidance, pooled text, the
  refiner's), hence `temb`; adaLN modulation and gated residual adds. The big matmuls
  (projections, MLPs, modulation linears) run in `cfg.dtype` with `cfg.param_dtype`
  weights.

  Joint attention follows an `AttentionPolicy` over the 60 joint layers, double blocks
  first: the first `dense_layers` dense, the others SVG-EAR on the video tokens with the
  text tokens dense (see `joint_attention`). The refiner is always dense. The sparse
  layers' k-means centroids live in `self.kmeans_state` (stacked over sparse layers,
  double then single), so successive calls warm-start; `reset_attention_state()` forgets
  them. Blocks are stacked and run with `lax.scan`, as in `WanTransformer`.

  `mesh` (or `set_mesh`): Ulysses sequence parallelism over a `jax.sharding.Mesh` with a
  "seq" axis (num_heads divisible by its size) and optionally a "data" axis for the batch
  (see models/parallel.py). The double and single blocks run in one `shard_map`: the
  video tokens sharded (padded to a multiple of the "seq" size), the text tokens
  replicated on every device; in each joint attention the video q|k|v go through one
  all-to-all, each device slices its heads of the text q, k, v, attends over exactly the
  single-device [video | text] sequence, and sends the video rows back through one
  all-to-all and all-gathers the text rows. The token refiner runs outside, replicated.
  None: the single-device program.
  """

  _block_stacks = ("transformer_blocks", "single_transformer_blocks")

  def __init__(self, cfg: HunyuanConfig, *, attention: AttentionLike = None,
               rngs: Optional[nnx.Rngs] = None, mesh: Optional[jax.sharding.Mesh] = None,
               fsdp: bool = False):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    d = cfg.dim
    self.config = cfg
    self.attention_policy = AttentionPolicy.coerce(attention)
    f32 = dict(dtype=F32, param_dtype=F32, rngs=rngs)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.x_embedder = nnx.Conv(cfg.in_channels, d, kernel_size=cfg.patch, strides=cfg.patch,
                               padding="VALID", precision=layers.matmul_precision(cfg.dtype),
                               **kw)
    self.context_embedder = TokenRefiner(cfg, rngs=rngs)
    self.timestep_embedder = layers.MLP(cfg.freq_dim, d, d, activation="silu", **f32)
    self.guidance_embedder = (layers.MLP(cfg.freq_dim, d, d, activation="silu", **f32)
                              if cfg.guidance_embeds else None)
    self.text_embedder = layers.MLP(cfg.pooled_projection_dim, d, d, activation="silu", **f32)
    self.transformer_blocks = _stack(cfg, DoubleStreamBlock, cfg.num_layers, rngs)
    self.single_transformer_blocks = _stack(cfg, SingleStreamBlock, cfg.num_single_layers, rngs)
    self.norm_out = AdaModulation(d, 2, **kw)  # (scale, shift), the diffusers order
    self.ln = layers.LayerNorm(d, eps=cfg.eps)
    self.proj_out = layers.linear(d, cfg.out_channels * math.prod(cfg.patch), **kw)
    self.kmeans_state = KMeansState(None)
    self.attention_density = AttentionDensity(None)
    self.seq_parallel = None
    if mesh is not None:
      self.set_mesh(mesh, fsdp=fsdp)

  def _check_inputs(self, hidden_states, timestep, text, text_mask, pooled, guidance):
    cfg = self.config
    shape = hidden_states.shape
    if len(shape) != 5 or shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states must be [B, {cfg.in_channels}, F, H, W], got {shape}")
    for n, p, axis in zip(shape[2:], cfg.patch, "FHW"):
      if n % p:
        raise ValueError(f"{axis}={n} is not a multiple of the patch size {p}")
    b = shape[0]
    expected = {"timestep": (timestep, (b,)),
                "encoder_hidden_states": (text, (b, None, cfg.text_dim)),
                "encoder_attention_mask": (text_mask, (b, None)),
                "pooled_projections": (pooled, (b, cfg.pooled_projection_dim))}
    if cfg.guidance_embeds:
      if guidance is None:
        raise ValueError("guidance must be given ([B], e.g. 6000.0 for scale 6): the model "
                         "has a guidance embedding")
      expected["guidance"] = (guidance, (b,))
    elif guidance is not None:
      raise ValueError("guidance given, but the model has no guidance embedding")
    for name, (value, want) in expected.items():
      got = tuple(jnp.shape(value))
      if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
        want_str = ", ".join("L_text" if w is None else str(w) for w in want)
        raise ValueError(f"{name} must have shape ({want_str}), got {got}")
    if text_mask.shape[1] != text.shape[1]:
      raise ValueError(f"encoder_attention_mask {text_mask.shape} does not match "
                       f"encoder_hidden_states {text.shape}")

  def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
               encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array,
               pooled_projections: jax.Array,
               guidance: Optional[jax.Array] = None) -> jax.Array:
    """One denoiser evaluation.

    Args:
      hidden_states: [B, C_in, F, H, W] latents; F, H, W multiples of the patch size.
      timestep: [B] (sigma * 1000, float).
      encoder_hidden_states: [B, L_text, text_dim] text-encoder states (prompt first, then
        padding).
      encoder_attention_mask: [B, L_text], 1 / True = prompt token.
      pooled_projections: [B, pooled_projection_dim] pooled CLIP text embedding.
      guidance: [B] embedded guidance (scale * 1000) if `config.guidance_embeds`.

    Returns:
      [B, C_out, F, H, W] in `config.dtype`.
    """
    cfg = self.config
    timestep, text_mask = jnp.asarray(timestep), jnp.asarray(encoder_attention_mask)
    self._check_inputs(hidden_states, timestep, encoder_hidden_states, text_mask,
                       pooled_projections, guidance)
    b = hidden_states.shape[0]
    grid = tuple(n // p for n, p in zip(hidden_states.shape[2:], cfg.patch))
    num_video = math.prod(grid)

    temb = (self.timestep_embedder(timestep_embedding(timestep, cfg.freq_dim))
            + self.text_embedder(jnp.asarray(pooled_projections, F32)))
    if self.guidance_embedder is not None:
      temb = temb + self.guidance_embedder(
          timestep_embedding(jnp.asarray(guidance), cfg.freq_dim))

    x = jnp.transpose(hidden_states, (0, 2, 3, 4, 1)).astype(cfg.dtype)  # [B, F, H, W, C]
    x = self.x_embedder(x).reshape(b, num_video, cfg.dim)  # raster order f -> h -> w
    ctx = self.context_embedder(encoder_hidden_states, timestep, text_mask).astype(cfg.dtype)

    cos, sin = layers.rope_tables(grid, cfg.rope_axes_dim, cfg.rope_theta)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    x = self._run_blocks(x, ctx, temb, rope, ja.joint_key_lengths(num_video, text_mask))

    m = self.norm_out(temb)
    x = layers.modulate(self.ln(x), m[:, 1], m[:, 0]).astype(cfg.dtype)
    x = self.proj_out(x)  # [B, L, C_out * pt * ph * pw], C slowest

    pt, ph, pw = cfg.patch
    x = x.reshape(b, *grid, cfg.out_channels, pt, ph, pw)
    x = jnp.transpose(x, (0, 4, 1, 5, 2, 6, 3, 7))
    return x.reshape(b, cfg.out_channels, *(n * p for n, p in zip(grid, cfg.patch)))

  def _run_blocks(self, x: jax.Array, ctx: jax.Array, temb: jax.Array, rope: Rope,
                  kv_len: jax.Array) -> jax.Array:
    """Double then single blocks; returns the video tokens [B, L_v, D]."""
    cfg = self.config
    svg_ear = self.attention_policy.svg_ear
    sparse = self.attention_policy.num_dense(cfg.num_joint_layers) < cfg.num_joint_layers
    state = None
    if sparse:
      lead = (cfg.num_joint_layers - self.attention_policy.num_dense(cfg.num_joint_layers),
              x.shape[0], cfg.num_heads)
      state = matching_state(self.kmeans_state.get_value(),
                             (*lead, svg_ear.num_q_clusters, cfg.head_dim),
                             (*lead, svg_ear.num_k_clusters, cfg.head_dim))
    double = nnx.split(self.transformer_blocks)
    single = nnx.split(self.single_transformer_blocks)
    if self.seq_parallel is None:
      x, new_state, density = self._block_stack(double, single, x, ctx, temb, rope, kv_len,
                                                state)
    else:
      x, new_state, density = self._block_stack_sharded(double, single, x, ctx, temb, rope,
                                                        kv_len, state)
    if sparse:
      self.kmeans_state.set_value(new_state)
      self.attention_density.set_value(density)
    return x

  def _block_stack_sharded(self, double, single, x, ctx, temb, rope, kv_len, state):
    """`_block_stack` in one shard_map over `self.seq_parallel`: video tokens (and RoPE)
    padded to a multiple of the "seq" size and sharded, text tokens replicated, the batch
    over "data"; returns the full unpadded video tokens [B, L_v, D]."""
    sp = self.seq_parallel
    b, n = x.shape[:2]
    uly = sp.ulysses(num_heads=self.config.num_heads, batch=b, num_tokens=n,
                     num_replicated=ctx.shape[1])
    n_pad = sp.padded(n)
    x = sp.pad(x, n_pad, axis=1)
    rope = tuple(sp.pad(t, n_pad, axis=0) for t in rope)
    (double_def, double_params), (single_def, single_params) = double, single
    double_specs, single_specs = sp.weight_specs(double_params), sp.weight_specs(single_params)
    state_spec = sp.spec(".ds")

    def body(double_params, single_params, x, ctx, temb, rope, kv_len, state):
      x, new_state, density = self._block_stack(
          (double_def, double_params), (single_def, single_params), x, ctx, temb, rope, kv_len,
          state, uly, (lambda p: sp.gather_layer(p, double_specs),
                       lambda p: sp.gather_layer(p, single_specs)))
      return jax.lax.all_gather(x, parallel.SEQ, axis=1, tiled=True), new_state, density

    run = parallel.shard_map(
        body, sp.mesh,
        in_specs=(double_specs, single_specs, sp.spec("ds"), sp.spec("d"), sp.spec("d"),
                  sp.spec("s"), sp.spec("d"), state_spec),
        out_specs=(sp.spec("d"), state_spec, state_spec))
    x, new_state, density = run(double_params, single_params, x, ctx, temb, rope, kv_len, state)
    return x[:, :n], new_state, density

  def _block_stack(self, double, single, x, ctx, temb, rope, kv_len, state,
                   ulysses: Optional[parallel.Ulysses] = None,
                   gathers: Tuple[Optional[Callable], Optional[Callable]] = (None, None)):
    """Double then single blocks (`double` / `single`: the stacks' (graphdef, params)),
    SVG-EAR warm-started from `state` (stacked over the sparse layers, None = cold).
    Returns (video tokens, new state, density), the last two None when all is dense.

    `ulysses` (inside the shard_map of `_block_stack_sharded`): x is this device's shard
    of the video tokens, ctx the whole text, and each joint attention core runs between
    the all-to-alls on its heads; `gathers` all-gather one layer's FSDP-sharded weights.
    """
    cfg = self.config
    num_video, num_text = x.shape[1], ctx.shape[1]  # num_video: local with ulysses
    num_video_all = num_video if ulysses is None else ulysses.num_tokens
    policy = self.attention_policy
    n_dense = policy.num_dense(cfg.num_joint_layers)
    dense_double = min(n_dense, cfg.num_layers)
    dense_single = min(max(n_dense - cfg.num_layers, 0), cfg.num_single_layers)
    sparse_double = cfg.num_layers - dense_double
    wrap = (lambda fn: fn) if ulysses is None else ulysses.wrap

    def dense_fn(q, k, v):
      return ja.masked_dense_attention(q, k, v, kv_len)

    def double_step(block, carry, attention_fn):
      return block(*carry, temb, rope, attention_fn)

    def single_step(block, carry, attention_fn):
      return block(carry, num_video, temb, rope, attention_fn)

    svg_ear = policy.svg_ear
    key_mask = None
    if n_dense < cfg.num_joint_layers:
      key_mask = ja.joint_key_mask(kv_len, num_video_all + num_text)

    def sparse_core(q, k, v, st):
      if ulysses is None:
        return ja.svg_ear_joint_attention(q, k, v, svg_ear, st, num_text=num_text,
                                          key_mask=key_mask)
      return ulysses.svg_ear(q, k, v, svg_ear, st, num_dense_tokens=num_text,
                             key_mask=key_mask)

    def run(blocks, start, split, stop, carry, step, layer_state, gather):
      """Layers [start, split) dense, [split, stop) SVG-EAR with `layer_state` stacked."""
      if split > start:
        carry, _ = _scan(blocks, start, split, carry,
                         lambda blk, c, _: (step(blk, c, wrap(dense_fn)), None), gather=gather)
      if stop == split:
        return carry, None

      def sparse_step(block, carry, st):
        aux = {}

        def attention_fn(q, k, v):
          out, aux["state"], aux["density"] = sparse_core(q, k, v, st)
          return out

        carry = step(block, carry, wrap(attention_fn))
        return carry, (aux["state"], aux["density"])

      return _scan(blocks, split, stop, carry, sparse_step, layer_state, gather=gather)

    take = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], state)
    (x, ctx), aux_double = run(double, 0, dense_double, cfg.num_layers, (x, ctx), double_step,
                               take(0, sparse_double), gathers[0])
    xs, aux_single = run(single, 0, dense_single, cfg.num_single_layers,
                         jnp.concatenate([x, ctx], axis=1), single_step,
                         take(sparse_double, None), gathers[1])
    if key_mask is None:
      return xs[:, :num_video], None, None
    parts = [a for a in (aux_double, aux_single) if a is not None]
    new_state, density = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
    return xs[:, :num_video], new_state, density
