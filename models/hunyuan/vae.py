"""HunyuanVideo VAE in flax.nnx, mirroring diffusers `AutoencoderKLHunyuanVideo`.

Public tensors are NCTHW like diffusers (`[B, C, F, H, W]`); inside, activations are
channels-last `[B, T, H, W, C]`. Parameter names follow the diffusers state dict (see
`models.hunyuan.vae_convert`), with torch weights transposed to flax layout.

Unlike the Wan VAE, this one is not run frame chunk by frame chunk: its mid-block attention
is frame-causal over all tokens of the clip (frame i sees frames <= i), so a tile is
processed whole, as diffusers does. Every conv is causal in time and pads with *replicate*
(time: the first frame twice in front; space: edge pixels). Long or large inputs are split
into overlapping tiles exactly as diffusers' `_temporal_tiled_decode` / `tiled_decode`
(and the encode counterparts) do, with diffusers' defaults: temporal tiling on (16-frame
tiles every 12 frames), spatial tiling off (`HunyuanVAETiling`). Each tile goes through one
jitted function, traced once per tile shape (`TRACE_COUNTS` counts traces).
"""

import collections
import dataclasses
import math
from typing import Any, Callable, ClassVar, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import vae_tiling
from models.causal_conv import CausalConv3d
from models.config_common import DiTConfigMixin
from models.layers import linear, matmul_precision

SCALING_FACTOR = 0.476986
_DOWN = "HunyuanVideoDownBlock3D"
_UP = "HunyuanVideoUpBlock3D"

_ARCH_FIELDS = ("in_channels", "out_channels", "latent_channels", "down_block_types",
                "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
                "spatial_compression_ratio", "temporal_compression_ratio",
                "mid_block_add_attention")

TRACE_COUNTS: collections.Counter = collections.Counter()  # "decode" / "encode" -> traces


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig(DiTConfigMixin):
  """Constructor arguments of diffusers `AutoencoderKLHunyuanVideo` (same names, same
  defaults = the HunyuanVideo VAE), plus dtypes.

  Attributes:
    in_channels, out_channels: video channels.
    latent_channels: latent channels (the encoder's conv_out gives twice as many).
    down_block_types, up_block_types: one "HunyuanVideoDownBlock3D" / "HunyuanVideoUpBlock3D"
      per entry of block_out_channels (the only kinds diffusers has).
    block_out_channels: encoder stage widths (the decoder uses them reversed).
    layers_per_block: resnets per encoder stage (decoder stages have one more).
    act_fn: "silu" (= "swish").
    norm_num_groups: GroupNorm groups; must divide every width.
    scaling_factor: `decode` divides its input by it, `encode` multiplies its output by it.
    spatial_compression_ratio: 2 ** (spatial x2 stages); stages 0 .. log2 - 1 resample.
    temporal_compression_ratio: 4 (diffusers' decoder supports nothing else): the two
      stages before the last halve time.
    mid_block_add_attention: whether the mid blocks have their attention layer.
    param_dtype, dtype: weight and compute dtypes (the reference runs the VAE in float32).
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  down_block_types: Tuple[str, ...] = (_DOWN,) * 4
  up_block_types: Tuple[str, ...] = (_UP,) * 4
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  norm_num_groups: int = 32
  scaling_factor: float = SCALING_FACTOR
  spatial_compression_ratio: int = 8
  temporal_compression_ratio: int = 4
  mid_block_add_attention: bool = True
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = _ARCH_FIELDS
  FAMILY: ClassVar[str] = "HunyuanVideo VAE"

  @classmethod
  def variants(cls):
    return {"hunyuan-video": cls}

  def __post_init__(self):
    def fix(name, value):
      object.__setattr__(self, name, value)

    for name, cast in (("down_block_types", str), ("up_block_types", str),
                       ("block_out_channels", int)):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"HunyuanVAEConfig.{name}={value!r}: expected a sequence")
      fix(name, tuple(cast(v) for v in value))
    fix("param_dtype", jnp.dtype(self.param_dtype))
    fix("dtype", jnp.dtype(self.dtype))
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                 "norm_num_groups", "spatial_compression_ratio", "temporal_compression_ratio"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HunyuanVAEConfig.{name}={value!r}: must be an int >= 1")
    n = len(self.block_out_channels)
    if not n or min(self.block_out_channels) < 1:
      raise ValueError(f"HunyuanVAEConfig.block_out_channels={self.block_out_channels}: need "
                       ">= 1 widths >= 1")
    for name, kind in (("down_block_types", _DOWN), ("up_block_types", _UP)):
      value = getattr(self, name)
      if len(value) != n or any(v != kind for v in value):
        raise ValueError(f"HunyuanVAEConfig.{name}={value}: need {n} x {kind!r} (one per "
                         "block_out_channels entry; diffusers has no other kind)")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"HunyuanVAEConfig: norm_num_groups={self.norm_num_groups} does not "
                       f"divide block_out_channels {bad}")
    if self.act_fn not in ("silu", "swish"):
      raise ValueError(f"HunyuanVAEConfig.act_fn={self.act_fn!r}: only 'silu' is supported")
    if not (isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0):
      raise ValueError(f"HunyuanVAEConfig.scaling_factor={self.scaling_factor!r}: must be > 0")
    if not isinstance(self.mid_block_add_attention, bool):
      raise ValueError(f"HunyuanVAEConfig.mid_block_add_attention="
                       f"{self.mid_block_add_attention!r}: must be a bool")
    if self.temporal_compression_ratio != 4:
      raise ValueError(f"HunyuanVAEConfig.temporal_compression_ratio="
                       f"{self.temporal_compression_ratio}: only 4 is supported (as in "
                       "diffusers' decoder)")
    factors = stage_factors(self)
    spatial = math.prod(s for _, s in factors)
    temporal = math.prod(t for t, _ in factors)
    if (spatial, temporal) != (self.spatial_compression_ratio,
                               self.temporal_compression_ratio):
      raise ValueError(f"HunyuanVAEConfig: spatial / temporal_compression_ratio = "
                       f"{self.spatial_compression_ratio} / {self.temporal_compression_ratio}, "
                       f"but {n} blocks give {spatial} / {temporal}")

  @classmethod
  def from_diffusers_config(cls, raw: Mapping[str, Any], **overrides) -> "HunyuanVAEConfig":
    """From an `AutoencoderKLHunyuanVideo` config.json dict (`_*` bookkeeping keys
    ignored)."""
    name = raw.get("_class_name", "AutoencoderKLHunyuanVideo")
    if name != "AutoencoderKLHunyuanVideo":
      raise ValueError(f"not an AutoencoderKLHunyuanVideo config: _class_name={name!r}")
    return cls.from_dict({k: v for k, v in raw.items() if not k.startswith("_")}, **overrides)

  def describe(self) -> str:
    return (f"HunyuanVideo VAE (latent_channels={self.latent_channels}, block_out_channels="
            f"{list(self.block_out_channels)}, layers_per_block={self.layers_per_block})")


def stage_factors(cfg: HunyuanVAEConfig) -> List[Tuple[int, int]]:
  """(time, space) resampling factor of encoder stage i (decoder stage i mirrors it), by
  diffusers' rule for temporal ratio 4: space halves in stages < log2(spatial ratio), time
  in the two stages before the last."""
  n = len(cfg.block_out_channels)
  n_spatial = int(np.log2(cfg.spatial_compression_ratio))
  n_time = int(np.log2(cfg.temporal_compression_ratio))
  return [(2 if n - 1 - n_time <= i < n - 1 else 1, 2 if i < n_spatial else 1)
          for i in range(n)]


@dataclasses.dataclass(frozen=True)
class HunyuanVAETiling:
  """diffusers' tiling state, in video pixels / frames.

  `temporal` is diffusers' `use_framewise_decoding` / `_encoding` (on by default there):
  more than tile_sample_min_num_frames frames (decode: more than min_num_frames / 4 latent
  frames) are processed in tiles of min_num_frames (+1) frames every stride_num_frames,
  blended over min - stride frames. `spatial` is `enable_tiling()`: inputs larger than
  min_height x min_width go in tiles of that size every stride pixels, blended linearly over
  the overlap. diffusers' defaults; `HunyuanVAETiling(spatial=True, ...)` is
  `vae.enable_tiling(...)`.
  """

  spatial: bool = False
  temporal: bool = True
  tile_sample_min_height: int = 256
  tile_sample_min_width: int = 256
  tile_sample_min_num_frames: int = 16
  tile_sample_stride_height: int = 192
  tile_sample_stride_width: int = 192
  tile_sample_stride_num_frames: int = 12

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name in ("spatial", "temporal"):
        if not isinstance(value, bool):
          raise ValueError(f"HunyuanVAETiling.{f.name}={value!r}: must be a bool")
      elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HunyuanVAETiling.{f.name}={value!r}: must be an int >= 1")
    for what in ("height", "width", "num_frames"):
      if (getattr(self, f"tile_sample_stride_{what}") >
          getattr(self, f"tile_sample_min_{what}")):
        raise ValueError(f"HunyuanVAETiling: strides must not exceed the tile size ({self})")

  def latent_sizes(self, spatial_ratio: int, temporal_ratio: int) -> Tuple[int, ...]:
    """(min_height, min_width, min_frames, stride_height, stride_width, stride_frames) in
    latent units, floored as diffusers does; each must be >= 1."""
    sizes = (self.tile_sample_min_height // spatial_ratio,
             self.tile_sample_min_width // spatial_ratio,
             self.tile_sample_min_num_frames // temporal_ratio,
             self.tile_sample_stride_height // spatial_ratio,
             self.tile_sample_stride_width // spatial_ratio,
             self.tile_sample_stride_num_frames // temporal_ratio)
    if min(sizes) < 1:
      raise ValueError(f"HunyuanVAETiling {self}: tiles and strides must be at least one "
                       f"latent pixel / frame ({spatial_ratio} pixels, {temporal_ratio} frames)")
    return sizes


DEFAULT_TILING = HunyuanVAETiling()


class GroupNorm(nnx.Module):
  """torch GroupNorm over channels-last input [B, ..., C]: statistics per sample and group
  of C / groups consecutive channels over all other axes, in float32; affine `weight`,
  `bias` (C,)."""

  def __init__(self, groups: int, channels: int, *, eps: float = 1e-6,
               param_dtype=jnp.float32):
    self.groups, self.eps = groups, eps
    self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    g = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class CausalConv(nnx.Module):
  """torch `HunyuanVideoCausalConv3d` (kernel 1 or 3, cubic): replicate-padded by k - 1
  frames in front and k // 2 pixels on each side, then a plain conv. The parameters live
  in `.conv`, as in the torch module."""

  def __init__(self, cin: int, cout: int, k: int, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs,
               stride=1):
    self.conv = CausalConv3d(cin, cout, k, stride=stride, padding=k // 2, pad_mode="replicate",
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, Cin] -> [B, T', H', W', Cout]
    return self.conv(x)


class ResnetBlock(nnx.Module):
  """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (k1 causal conv) shortcut
  (torch `HunyuanVideoResnetBlockCausal3D`)."""

  def __init__(self, cin: int, cout: int, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    groups, pd = cfg.norm_num_groups, cfg.param_dtype
    self.norm1 = GroupNorm(groups, cin, param_dtype=pd)
    self.conv1 = CausalConv(cin, cout, 3, cfg, rngs=rngs)
    self.norm2 = GroupNorm(groups, cout, param_dtype=pd)
    self.conv2 = CausalConv(cout, cout, 3, cfg, rngs=rngs)
    self.conv_shortcut = CausalConv(cin, cout, 1, cfg, rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


def causal_frame_mask(frames: int, tokens_per_frame: int) -> jax.Array:
  """[N, N] bool, N = frames * tokens_per_frame: query token i may attend key token j iff
  frame(j) <= frame(i) (diffusers `prepare_causal_attention_mask`, as a boolean).

  Built from iotas inside the program (XLA fuses it into its consumer): as a NumPy constant
  it was baked into the compiled program, N^2 bytes (5.2 GB for a temporal-only tile)."""
  frame = jnp.arange(frames * tokens_per_frame, dtype=jnp.int32) // tokens_per_frame
  return frame[None, :] <= frame[:, None]


class MidAttention(nnx.Module):
  """Single-head (head dim = C) self-attention over all T*H*W tokens with a frame-causal
  mask, GroupNorm first, residual (diffusers `Attention(..., _from_deprecated_attn_block)`
  as the HunyuanVideo mid block calls it)."""

  def __init__(self, dim: int, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.group_norm = GroupNorm(cfg.norm_num_groups, dim, param_dtype=cfg.param_dtype)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v = (linear(dim, dim, **kw) for _ in range(3))
    self.to_out = nnx.List([linear(dim, dim, **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> same
    b, t, h, w, c = x.shape
    tokens = x.reshape(b, t * h * w, c)
    normed = self.group_norm(tokens)
    q, k, v = self.to_q(normed), self.to_k(normed), self.to_v(normed)
    precision = matmul_precision(self.dtype)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=precision).astype(jnp.float32)
    logits = jnp.where(causal_frame_mask(t, h * w), logits / math.sqrt(c), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs, v, precision=precision)
    return (self.to_out[0](out) + tokens).reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
  """resnets.0 -> (attentions.0 -> resnets.1)."""

  def __init__(self, dim: int, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = (nnx.List([MidAttention(dim, cfg, rngs=rngs)])
                       if cfg.mid_block_add_attention else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Causal k3 conv with stride (time, space, space) (torch `HunyuanVideoDownsampleCausal3D`):
  T -> (T - 1) // st + 1, since the 2 replicated front frames make the first output see
  only frame 0."""

  def __init__(self, dim: int, factors: Tuple[int, int], cfg: HunyuanVAEConfig, *,
               rngs: nnx.Rngs):
    t, s = factors
    self.conv = CausalConv(dim, dim, 3, cfg, rngs=rngs, stride=(t, s, s))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """torch `HunyuanVideoUpsampleCausal3D`: frame 0 is upsampled in space only, frames 1..
  in time and space (nearest), T -> 1 + st (T - 1); then a causal k3 conv."""

  def __init__(self, dim: int, factors: Tuple[int, int], cfg: HunyuanVAEConfig, *,
               rngs: nnx.Rngs):
    self.factor_t, self.factor_s = factors
    self.conv = CausalConv(dim, dim, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.factor_s
    x = jnp.repeat(jnp.repeat(x, s, axis=2), s, axis=3)  # = nearest at an integer factor
    if x.shape[1] > 1:
      x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], self.factor_t, axis=1)], axis=1)
    return self.conv(x)


class DownBlock(nnx.Module):
  """layers_per_block resnets, then a downsampler if the stage resamples."""

  def __init__(self, cin: int, cout: int, factors: Tuple[int, int], cfg: HunyuanVAEConfig, *,
               rngs: nnx.Rngs):
    dims = [cin] + [cout] * (cfg.layers_per_block - 1)
    self.resnets = nnx.List([ResnetBlock(d, cout, cfg, rngs=rngs) for d in dims])
    self.downsamplers = (nnx.List([Downsample(cout, factors, cfg, rngs=rngs)])
                         if factors != (1, 1) else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resnets:
      x = block(x)
    return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nnx.Module):
  """layers_per_block + 1 resnets, then an upsampler if the stage resamples."""

  def __init__(self, cin: int, cout: int, factors: Tuple[int, int], cfg: HunyuanVAEConfig, *,
               rngs: nnx.Rngs):
    dims = [cin] + [cout] * cfg.layers_per_block
    self.resnets = nnx.List([ResnetBlock(d, cout, cfg, rngs=rngs) for d in dims])
    self.upsamplers = (nnx.List([Upsample(cout, factors, cfg, rngs=rngs)])
                       if factors != (1, 1) else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resnets:
      x = block(x)
    return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
  """Video [B, T, H, W, in_channels] -> moments [B, (T - 1) // 4 + 1, H / s, W / s,
  2 latent_channels] (torch `HunyuanVideoEncoder3D`, s = spatial ratio)."""

  def __init__(self, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    widths = cfg.block_out_channels
    self.conv_in = CausalConv(cfg.in_channels, widths[0], 3, cfg, rngs=rngs)
    ins = (widths[0], *widths[:-1])
    self.down_blocks = nnx.List([DownBlock(cin, cout, f, cfg, rngs=rngs)
                                 for cin, cout, f in zip(ins, widths, stage_factors(cfg))])
    self.mid_block = MidBlock(widths[-1], cfg, rngs=rngs)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], param_dtype=cfg.param_dtype)
    self.conv_out = CausalConv(widths[-1], 2 * cfg.latent_channels, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents [B, T, h, w, latent_channels] -> video [B, 1 + 4 (T - 1), h s, w s,
  out_channels] (torch `HunyuanVideoDecoder3D`)."""

  def __init__(self, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    widths = cfg.block_out_channels[::-1]
    self.conv_in = CausalConv(cfg.latent_channels, widths[0], 3, cfg, rngs=rngs)
    self.mid_block = MidBlock(widths[0], cfg, rngs=rngs)
    ins = (widths[0], *widths[:-1])
    self.up_blocks = nnx.List([UpBlock(cin, cout, f, cfg, rngs=rngs)
                               for cin, cout, f in zip(ins, widths, stage_factors(cfg))])
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], param_dtype=cfg.param_dtype)
    self.conv_out = CausalConv(widths[-1], cfg.out_channels, 3, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _decode_tile(graphdef, state, z):
  TRACE_COUNTS["decode"] += 1
  return nnx.merge(graphdef, state).decode_tile(z)


def _encode_tile(graphdef, state, video):
  TRACE_COUNTS["encode"] += 1
  return nnx.merge(graphdef, state).encode_tile(video)


_decode_tile_jit = jax.jit(_decode_tile, static_argnums=0)
_encode_tile_jit = jax.jit(_encode_tile, static_argnums=0)


class HunyuanVAE(nnx.Module):
  """HunyuanVideo VAE (diffusers `AutoencoderKLHunyuanVideo`).

  `decode` takes the DiT's latents as `HunyuanVideoPipeline` has them and divides them by
  `scaling_factor` itself (the pipeline does `latents / vae.config.scaling_factor` before
  `vae.decode`); `encode` returns the posterior mean times `scaling_factor`, i.e. latents
  in the DiT's scale. Output video is not clamped (diffusers does not clamp either).
  `decode_tile` / `encode_tile` are the unjitted per-tile functions.
  """

  def __init__(self, cfg: HunyuanVAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, **kw)
    self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1, **kw)

  @classmethod
  def from_pretrained(cls, path, *, dtype: Any = jnp.float32, progress: bool = False,
                      device: Optional[jax.Device] = None) -> "HunyuanVAE":
    """Loads a local diffusers `AutoencoderKLHunyuanVideo` (a `vae/` folder, a pipeline folder holding
    one, or a safetensors file beside its config.json); see `models.hunyuan.vae_convert.load_vae`."""
    from models.hunyuan.vae_convert import load_vae

    return load_vae(path, dtype=dtype, progress=progress, device=device)

  def decode_tile(self, z: jax.Array) -> jax.Array:
    """[B, latent_channels, T, h, w] unscaled latents -> [B, out_channels, 1 + 4 (T - 1),
    h s, w s] (s = spatial ratio): post_quant_conv and the decoder, no tiling."""
    x = self.post_quant_conv(vae_tiling.to_channels_last(z.astype(self.config.dtype)))
    return vae_tiling.to_channels_first(self.decoder(x))

  def encode_tile(self, video: jax.Array) -> jax.Array:
    """[B, in_channels, F, H, W] -> raw moments [B, 2 latent_channels, (F - 1) // 4 + 1,
    H / s, W / s] (mean channels then logvar channels), no tiling."""
    x = self.encoder(vae_tiling.to_channels_last(video.astype(self.config.dtype)))
    return vae_tiling.to_channels_first(self.quant_conv(x))

  def _check(self, x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
      raise ValueError(f"HunyuanVAE.{what}: expected [B, {channels}, F, H, W], got {x.shape}")

  def _tile_fn(self, jitted: Callable) -> Callable[[jax.Array], jax.Array]:
    graphdef, state = nnx.split(self)
    return lambda x: jitted(graphdef, state, x)

  def decode(self, latents: jax.Array, *,
             tiling: Optional[HunyuanVAETiling] = DEFAULT_TILING) -> jax.Array:
    """DiT latents -> video, as `HunyuanVideoPipeline` + `AutoencoderKLHunyuanVideo.decode`.

    Args:
      latents: [B, latent_channels, F_lat, h, w] in the DiT's scale (not yet divided by
        scaling_factor: this method does it).
      tiling: diffusers' tiling state (default: diffusers' default, temporal tiling only);
        None decodes everything at once.

    Returns:
      [B, out_channels, 4 (F_lat - 1) + 1, h s, w s], unclamped, `config.dtype`.
    """
    cfg = self.config
    self._check(latents, cfg.latent_channels, "decode")
    z = jnp.asarray(latents, jnp.float32) / np.float32(cfg.scaling_factor)
    fn = self._tile_fn(_decode_tile_jit)
    if tiling is None:
      return fn(z)
    s, r = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    _, _, min_t, _, _, stride_t = tiling.latent_sizes(s, r)
    if tiling.temporal and z.shape[2] > min_t:
      tiles = []
      for i in range(0, z.shape[2], stride_t):
        tile = z[:, :, i:i + min_t + 1]
        if i > 0 and tile.shape[2] == 1:
          break  # decodes to one frame, which is dropped: the tile adds nothing
        out = self._spatial_decode(fn, tile, tiling)
        tiles.append(out[:, :, 1:] if i > 0 else out)
      extent = tiling.tile_sample_min_num_frames - tiling.tile_sample_stride_num_frames
      out = vae_tiling.blend_frames(tiles, extent, tiling.tile_sample_stride_num_frames)
      return out[:, :, :(z.shape[2] - 1) * r + 1]
    return self._spatial_decode(fn, z, tiling)

  def _spatial_decode(self, fn: Callable, z: jax.Array, tiling: HunyuanVAETiling) -> jax.Array:
    """diffusers `tiled_decode` when spatial tiling is on and z exceeds a tile, else one
    call."""
    s = self.config.spatial_compression_ratio
    min_h, min_w, _, stride_h, stride_w, _ = tiling.latent_sizes(
        s, self.config.temporal_compression_ratio)
    _, _, _, h, w = z.shape
    if not (tiling.spatial and (h > min_h or w > min_w)):
      return fn(z)
    rows = [[fn(z[:, :, :, i:i + min_h, j:j + min_w]) for j in range(0, w, stride_w)]
            for i in range(0, h, stride_h)]
    out = vae_tiling.blend_tiles(
        rows, tiling.tile_sample_min_height - tiling.tile_sample_stride_height,
        tiling.tile_sample_min_width - tiling.tile_sample_stride_width,
        tiling.tile_sample_stride_height, tiling.tile_sample_stride_width)
    return out[..., :h * s, :w * s]

  def encode_moments(self, video: jax.Array, *,
                     tiling: Optional[HunyuanVAETiling] = DEFAULT_TILING
                     ) -> Tuple[jax.Array, jax.Array]:
    """Raw posterior of `video` (diffusers `encode(video).latent_dist`): (mean, logvar
    clipped to [-30, 20]), each [B, latent_channels, (F - 1) // 4 + 1, H / s, W / s], not
    scaled. `tiling` as in `decode` (temporal tiling when F > tile_sample_min_num_frames)."""
    cfg = self.config
    self._check(video, cfg.in_channels, "encode")
    x = jnp.asarray(video)
    fn = self._tile_fn(_encode_tile_jit)
    if tiling is None:
      moments = fn(x)
    elif tiling.temporal and x.shape[2] > tiling.tile_sample_min_num_frames:
      r = cfg.temporal_compression_ratio
      _, _, min_t, _, _, stride_t = tiling.latent_sizes(cfg.spatial_compression_ratio, r)
      frames = x.shape[2]
      tiles = []
      for i in range(0, frames, tiling.tile_sample_stride_num_frames):
        tile = x[:, :, i:i + tiling.tile_sample_min_num_frames + 1]
        if i > 0 and tile.shape[2] <= r:
          break  # encodes to one latent frame, which is dropped: the tile adds nothing
        out = self._spatial_encode(fn, tile, tiling)
        tiles.append(out[:, :, 1:] if i > 0 else out)
      moments = vae_tiling.blend_frames(tiles, min_t - stride_t, stride_t)
      moments = moments[:, :, :(frames - 1) // r + 1]
    else:
      moments = self._spatial_encode(fn, x, tiling)
    c = cfg.latent_channels
    return moments[:, :c], jnp.clip(moments[:, c:], -30.0, 20.0)

  def _spatial_encode(self, fn: Callable, x: jax.Array, tiling: HunyuanVAETiling) -> jax.Array:
    """diffusers `tiled_encode` when spatial tiling is on and x exceeds a tile, else one
    call."""
    s = self.config.spatial_compression_ratio
    min_h, min_w, _, stride_h, stride_w, _ = tiling.latent_sizes(
        s, self.config.temporal_compression_ratio)
    _, _, _, h, w = x.shape
    if not (tiling.spatial and (h > tiling.tile_sample_min_height or
                                w > tiling.tile_sample_min_width)):
      return fn(x)
    th, tw = tiling.tile_sample_min_height, tiling.tile_sample_min_width
    rows = [[fn(x[:, :, :, i:i + th, j:j + tw])
             for j in range(0, w, tiling.tile_sample_stride_width)]
            for i in range(0, h, tiling.tile_sample_stride_height)]
    out = vae_tiling.blend_tiles(rows, min_h - stride_h, min_w - stride_w, stride_h, stride_w)
    return out[..., :h // s, :w // s]

  def encode(self, video: jax.Array, *,
             tiling: Optional[HunyuanVAETiling] = DEFAULT_TILING) -> jax.Array:
    """Video -> DiT-scale latents: the posterior mean (diffusers `latent_dist.mode()`) times
    scaling_factor.

    Args:
      video: [B, in_channels, F, H, W] in [-1, 1].
      tiling: as in `decode`.

    Returns:
      [B, latent_channels, (F - 1) // 4 + 1, H / s, W / s] in `config.dtype`.
    """
    mean, _ = self.encode_moments(video, tiling=tiling)
    return mean * np.float32(self.config.scaling_factor).astype(mean.dtype)
