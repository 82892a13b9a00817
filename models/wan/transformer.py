"""Wan2.2 DiT (`WanTransformer`) in flax.nnx, mirroring diffusers `WanTransformer3DModel`."""

import math
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers, parallel
from models.attention import (AttentionDensity, AttentionLike, AttentionPolicy, KMeansState,
                              SparseAttentionMixin, matching_state, svg_ear_self_attention)
from models.wan.config import WanConfig
from svg_ear_jax import dense_attention

Rope = Tuple[jax.Array, jax.Array]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class WanAttention(nnx.Module):
  """Multi-head attention with RMSNorm on q and k across all heads (Wan `qk_norm`).

  Self-attention (`context=None`) applies RoPE and then `attention_fn` (dense or SVG-EAR);
  cross-attention over the text states is always dense.
  """

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.to_q = layers.linear(d, d, **kw)
    self.to_k = layers.linear(d, d, **kw)
    self.to_v = layers.linear(d, d, **kw)
    self.to_out = layers.linear(d, d, **kw)
    self.norm_q = layers.RMSNorm(d, eps=cfg.eps)
    self.norm_k = layers.RMSNorm(d, eps=cfg.eps)

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None,
               rope: Optional[Rope] = None,
               attention_fn: AttentionFn = dense_attention) -> jax.Array:
    """x: [B, L, D]; context: [B, L_ctx, D] (cross) or None (self) -> [B, L, D].

    `attention_fn` maps [B, L, H, Dh] q, k, v to [B, L, H, Dh].
    """
    kv_in = x if context is None else context
    q = self.norm_q(self.to_q(x))
    k = self.norm_k(self.to_k(kv_in))
    v = self.to_v(kv_in)
    q, k, v = (t.reshape(*t.shape[:2], self.num_heads, -1) for t in (q, k, v))
    if rope is not None:
      q = layers.apply_rope(q, *rope)
      k = layers.apply_rope(k, *rope)
    out = attention_fn(q, k, v)
    return self.to_out(out.reshape(*out.shape[:2], -1))


class WanBlock(nnx.Module):
  """adaLN-modulated self-attention, cross-attention to text, and feed-forward."""

  def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.dtype = cfg.dtype
    self.norm1 = layers.LayerNorm(d, eps=cfg.eps)
    self.attn1 = WanAttention(cfg, rngs=rngs)
    self.norm2 = layers.LayerNorm(d, eps=cfg.eps, affine=True) if cfg.cross_attn_norm else None
    self.attn2 = WanAttention(cfg, rngs=rngs)
    self.norm3 = layers.LayerNorm(d, eps=cfg.eps)
    self.ffn = layers.MLP(d, cfg.ffn_dim, d, activation="gelu_tanh", dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 6, d), jnp.float32) / d**0.5)

  def __call__(self, x: jax.Array, context: jax.Array, e: jax.Array, rope: Rope,
               attention_fn: AttentionFn = dense_attention) -> jax.Array:
    """x: [B, L, D]; context: [B, L_text, D]; e: [B, 6, D] or per token [B, L, 6, D] f32.

    `attention_fn` is the self-attention core ([B, L, H, Dh] q, k, v -> same).
    """
    table = self.scale_shift_table[...]
    mod = (table + e)[:, None] if e.ndim == 3 else table[None] + e  # [B, 1 | L, 6, D]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (mod[..., i, :] for i in range(6))

    h = layers.modulate(self.norm1(x), shift_msa, scale_msa).astype(self.dtype)
    attn = self.attn1(h, rope=rope, attention_fn=attention_fn)
    x = (x.astype(jnp.float32) + attn * gate_msa).astype(self.dtype)

    h = x if self.norm2 is None else self.norm2(x).astype(self.dtype)
    x = x + self.attn2(h, context=context)

    h = layers.modulate(self.norm3(x), c_shift, c_scale).astype(self.dtype)
    x = (x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * c_gate).astype(self.dtype)
    return x


class WanTransformer(SparseAttentionMixin, parallel.SequenceParallelMixin, nnx.Module):
  """Wan2.2 DiT: `[B, C, F, H, W]` noisy latents -> `[B, C_out, F, H, W]` flow prediction.

  Covers T2V-A14B and I2V-A14B (one expert each; see `WanExpertPair`) and TI2V-5B
  (per-token timesteps). Float32 islands as in the reference: LayerNorms, q/k RMSNorms,
  the time embedding and projection, the modulation tables and RoPE; `cfg.dtype` /
  `cfg.param_dtype` elsewhere.

  Self-attention follows an `AttentionPolicy`: the first `dense_layers` blocks dense, the
  others SVG-EAR. The sparse layers' k-means centroids live in `self.kmeans_state`
  (stacked over layers), so successive calls (denoising steps) warm-start;
  `reset_attention_state()` forgets them (start of a new video).

  Layers are scanned: the blocks' weights are stacked on a leading `num_layers` axis and
  `lax.scan` runs them, once over the dense prefix and once over the sparse rest (the body
  indexes layer i's weights, so no slice of the stack is copied). Scan beat a Python loop
  over the layers on CPU (jax 0.10.2, 2 shared cores, fp32, B=1, dense attention; whole
  forward under `nnx.jit`, first call (trace + compile) / median of 5 later calls):
    tiny      (2 layers, dim 32, 192 tokens):     scan 0.98 s / 3.8 ms,  loop 1.49 s / 6.5 ms
    medium    (8 layers, dim 512, 1,560 tokens):  scan 2.3 s / 1.35 s,   loop 5.4 s / 1.51 s
    40 layers (dim 256, 192 tokens):              scan 1.5 s / 257 ms,   loop 23.1 s / 288 ms
  Timing the block stack alone against a loop over unstacked `nnx.List` blocks gave the
  same picture (first call 0.5-0.8 s vs 0.8-0.9 s tiny, 1.8-3.3 s vs 3.6-4.5 s medium,
  0.9 s vs 5.7 s at 40 layers; equal run times). Scan traces and compiles one block
  whatever the depth and has less per-call overhead; each layer's SVG-EAR state is the
  scan's per-layer input and output.

  `mesh` (or `set_mesh`): Ulysses sequence parallelism over a `jax.sharding.Mesh` with a
  "seq" axis (num_heads divisible by its size) and optionally a "data" axis for the batch
  (see models/parallel.py). The block stack runs in one `shard_map`, tokens sharded
  (padded to a multiple of the "seq" size), with one all-to-all of q|k|v before and one
  of the output after each self-attention; the k-means state is sharded by head. None:
  the single-device program.
  """

  _block_stacks = ("blocks",)

  def __init__(self, cfg: WanConfig, *, attention: AttentionLike = None,
               rngs: Optional[nnx.Rngs] = None, mesh: Optional[jax.sharding.Mesh] = None,
               fsdp: bool = False):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    d = cfg.dim
    self.config = cfg
    self.attention_policy = AttentionPolicy.coerce(attention)
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.patch_embedding = nnx.Conv(cfg.in_channels, d, kernel_size=cfg.patch_size,
                                    strides=cfg.patch_size, padding="VALID", dtype=cfg.dtype,
                                    param_dtype=cfg.param_dtype,
                                    precision=layers.matmul_precision(cfg.dtype), rngs=rngs)
    self.time_embedder = layers.MLP(cfg.freq_dim, d, d, activation="silu", **f32)
    self.time_proj = layers.linear(d, 6 * d, **f32)
    self.text_embedder = layers.MLP(cfg.text_dim, d, d, activation="gelu_tanh",
                                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_blocks(rngs):
      return WanBlock(cfg, rngs=rngs)

    self.blocks = stacked_blocks(rngs)  # every Param has a leading [num_layers] axis
    self.norm_out = layers.LayerNorm(d, eps=cfg.eps)
    self.proj_out = layers.linear(d, cfg.out_channels * math.prod(cfg.patch_size),
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 2, d), jnp.float32) / d**0.5)
    self.kmeans_state = KMeansState(None)
    self.attention_density = AttentionDensity(None)
    self.seq_parallel = None
    if mesh is not None:
      self.set_mesh(mesh, fsdp=fsdp)

  def _grid(self, shape) -> Tuple[int, int, int]:
    cfg = self.config
    if len(shape) != 5 or shape[1] != cfg.in_channels:
      raise ValueError(f"hidden_states must be [B, {cfg.in_channels}, F, H, W], got {shape}")
    for n, p, axis in zip(shape[2:], cfg.patch_size, "FHW"):
      if n % p:
        raise ValueError(f"{axis}={n} is not a multiple of the patch size {p}")
    grid = tuple(n // p for n, p in zip(shape[2:], cfg.patch_size))
    if max(grid) > cfg.rope_max_seq_len:
      raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")
    return grid

  def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
               encoder_hidden_states: jax.Array) -> jax.Array:
    """One denoiser evaluation.

    Args:
      hidden_states: [B, C_in, F, H, W] latents (I2V: noise, mask and image latent stacked
        on C); F, H, W multiples of the patch size.
      timestep: [B], or [B, L] per token (TI2V), L = (F/pt) * (H/ph) * (W/pw).
      encoder_hidden_states: [B, L_text, text_dim] text-encoder states (no mask: padding
        tokens are attended to, as in the reference).

    Returns:
      [B, C_out, F, H, W] in `config.dtype`.
    """
    cfg = self.config
    b = hidden_states.shape[0]
    grid = self._grid(hidden_states.shape)
    num_tokens = math.prod(grid)
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or (
        encoder_hidden_states.shape[2] != cfg.text_dim):
      raise ValueError(f"encoder_hidden_states must be [B={b}, L_text, {cfg.text_dim}], got "
                       f"{encoder_hidden_states.shape}")
    timestep = jnp.asarray(timestep)
    if timestep.shape not in ((b,), (b, num_tokens)):
      raise ValueError(f"timestep must be [B] = ({b},) or [B, L] = ({b}, {num_tokens}), got "
                       f"{timestep.shape}")

    x = jnp.transpose(hidden_states, (0, 2, 3, 4, 1)).astype(cfg.dtype)  # [B, F, H, W, C]
    x = self.patch_embedding(x).reshape(b, num_tokens, cfg.dim)  # raster order f -> h -> w

    sinusoid = layers.timestep_embedding(timestep.reshape(-1), cfg.freq_dim)
    temb = self.time_embedder(sinusoid).reshape(*timestep.shape, cfg.dim)  # [B, (L,) D] f32
    e = self.time_proj(jax.nn.silu(temb)).reshape(*timestep.shape, 6, cfg.dim)
    context = self.text_embedder(encoder_hidden_states.astype(cfg.dtype))

    cos, sin = layers.rope_tables(grid, layers.rope_axis_dims(cfg.head_dim), cfg.rope_theta)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    x = self._run_blocks(x, context, e, rope)

    # The head modulates with temb itself, not with the projected e.
    table = self.scale_shift_table[...]  # [1, 2, D]
    if temb.ndim == 2:
      mod = (table + temb[:, None])[:, None]  # [B, 1, 2, D]
    else:
      mod = table[None] + temb[:, :, None]  # [B, L, 2, D]
    x = layers.modulate(self.norm_out(x), mod[..., 0, :], mod[..., 1, :]).astype(cfg.dtype)
    x = self.proj_out(x)  # [B, L, pt * ph * pw * C_out], C fastest

    pt, ph, pw = cfg.patch_size
    x = x.reshape(b, *grid, pt, ph, pw, cfg.out_channels)
    x = jnp.transpose(x, (0, 7, 1, 4, 2, 5, 3, 6))
    return x.reshape(b, cfg.out_channels, *(n * p for n, p in zip(grid, cfg.patch_size)))

  def _run_blocks(self, x: jax.Array, context: jax.Array, e: jax.Array, rope: Rope) -> jax.Array:
    cfg = self.config
    graphdef, params = nnx.split(self.blocks)
    n_dense = self.attention_policy.num_dense(cfg.num_layers)
    state = None
    if n_dense < cfg.num_layers:
      svg_ear = self.attention_policy.svg_ear
      lead = (cfg.num_layers - n_dense, x.shape[0], cfg.num_heads)
      state = matching_state(self.kmeans_state.get_value(),
                             (*lead, svg_ear.num_q_clusters, cfg.head_dim),
                             (*lead, svg_ear.num_k_clusters, cfg.head_dim))
    if self.seq_parallel is None:
      x, new_state, density = self._block_stack(graphdef, params, x, context, e, rope, state)
    else:
      x, new_state, density = self._block_stack_sharded(graphdef, params, x, context, e, rope,
                                                        state)
    if n_dense < cfg.num_layers:
      self.kmeans_state.set_value(new_state)
      self.attention_density.set_value(density)
    return x

  def _block_stack_sharded(self, graphdef, params, x, context, e, rope, state):
    """`_block_stack` in one shard_map over `self.seq_parallel`: tokens (and per-token
    e, RoPE) padded to a multiple of the "seq" size and sharded, the batch over "data";
    returns the full unpadded x [B, L, D]."""
    sp = self.seq_parallel
    b, n = x.shape[:2]
    uly = sp.ulysses(num_heads=self.config.num_heads, batch=b, num_tokens=n)
    n_pad = sp.padded(n)
    x = sp.pad(x, n_pad, axis=1)
    rope = tuple(sp.pad(t, n_pad, axis=0) for t in rope)
    e_spec = sp.spec("d")
    if e.ndim == 4:  # per-token timesteps
      e, e_spec = sp.pad(e, n_pad, axis=1), sp.spec("ds")
    param_specs = sp.weight_specs(params)
    state_spec = sp.spec(".ds")

    def body(params, x, context, e, rope, state):
      x, new_state, density = self._block_stack(graphdef, params, x, context, e, rope, state,
                                                uly, lambda p: sp.gather_layer(p, param_specs))
      return jax.lax.all_gather(x, parallel.SEQ, axis=1, tiled=True), new_state, density

    run = parallel.shard_map(
        body, sp.mesh,
        in_specs=(param_specs, sp.spec("ds"), sp.spec("d"), e_spec, sp.spec("s"), state_spec),
        out_specs=(sp.spec("d"), state_spec, state_spec))
    x, new_state, density = run(params, x, context, e, rope, state)
    return x[:, :n], new_state, density

  def _block_stack(self, graphdef, params, x, context, e, rope, state,
                   ulysses: Optional[parallel.Ulysses] = None,
                   gather: Optional[Callable] = None):
    """The scanned blocks: dense prefix, then SVG-EAR warm-started from `state` (stacked
    over the sparse layers, None = cold). Returns (x, new state, density), the last two
    None when every layer is dense.

    `ulysses` (inside the shard_map of `_block_stack_sharded`): x is this device's token
    shard and each self-attention core runs between the all-to-alls on its heads;
    `gather` all-gathers one layer's FSDP-sharded weights.
    """
    cfg = self.config
    n_dense = self.attention_policy.num_dense(cfg.num_layers)

    def run_layer(i, x, attention_fn):
      layer = jax.tree.map(lambda a: a[i], params)
      if gather is not None:
        layer = gather(layer)
      block = nnx.merge(graphdef, layer)
      return block(x, context, e, rope, attention_fn)

    dense_fn = dense_attention if ulysses is None else ulysses.wrap(dense_attention)
    if n_dense:
      x, _ = jax.lax.scan(lambda x, i: (run_layer(i, x, dense_fn), None), x,
                          jnp.arange(n_dense))
    if n_dense == cfg.num_layers:
      return x, None, None

    svg_ear = self.attention_policy.svg_ear
    svg_ear_fn = svg_ear_self_attention if ulysses is None else ulysses.svg_ear

    def sparse_layer(x, xs):
      i, layer_state = xs
      aux = {}

      def attention_fn(q, k, v):
        out, aux["state"], aux["density"] = svg_ear_fn(q, k, v, svg_ear, layer_state)
        return out

      x = run_layer(i, x, attention_fn if ulysses is None else ulysses.wrap(attention_fn))
      return x, (aux["state"], aux["density"])

    x, (new_state, density) = jax.lax.scan(
        sparse_layer, x, (jnp.arange(n_dense, cfg.num_layers), state))
    return x, new_state, density
