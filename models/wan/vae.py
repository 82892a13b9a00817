"""Wan video VAEs in flax.nnx, mirroring diffusers `AutoencoderKLWan`: the Wan2.1 VAE
(z_dim 16; the VAE of Wan2.2 T2V-A14B and I2V-A14B) and the Wan2.2 VAE (z_dim 48, 2x2
patches, residual up/down blocks; TI2V-5B).

Public tensors are NCTHW like diffusers (`[B, C, F, H, W]`); inside, activations are
channels-last `[B, T, H, W, C]`. Parameter names follow the diffusers state dict (see
`models.wan.vae_convert`), with torch weights transposed to flax layout.

Video is processed causally in time, chunk by chunk, as diffusers does: decoding takes one
latent frame per chunk (the first gives 1 frame, every later one 4), encoding takes the
first frame and then 4 frames per chunk. Every time-padded conv carries the last frames of
its input from chunk to chunk (`models.causal_conv`); the whole cache is one pytree that
`decode_chunk` / `encode_chunk` take and return. The first chunk (cache None) differs in
structure: the time-upsampling conv is skipped there (diffusers' "Rep" sentinel) and the
time-downsampling conv only records its input. All later chunks have the same cache
shapes, so the jitted chunk function is traced twice per input shape and then reused
(`TRACE_COUNTS` counts traces).
"""

import collections
import dataclasses
import math
from typing import Any, ClassVar, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import vae_tiling
from models.causal_conv import CACHE_T, CausalConv3d
from models.config_common import DiTConfigMixin
from models.layers import matmul_precision

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# diffusers config.json keys that are not architecture: bookkeeping and a flag the Wan2.2
# conversion script writes but the class does not take.
_IGNORED_DIFFUSERS_KEYS = ("clip_output",)

_ARCH_FIELDS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks",
                "attn_scales", "temperal_downsample", "is_residual", "in_channels",
                "out_channels", "patch_size")

TRACE_COUNTS: collections.Counter = collections.Counter()  # "decode" / "encode" -> traces


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(DiTConfigMixin):
  """Constructor arguments of diffusers `AutoencoderKLWan` (same names, same defaults =
  the Wan2.1 VAE), plus dtypes.

  Attributes:
    base_dim: encoder width of the first stage; stage widths are base_dim * [1, *dim_mult].
    decoder_base_dim: decoder base width (None: base_dim).
    z_dim: latent channels.
    dim_mult: per-stage width multipliers; len(dim_mult) - 1 spatial x2 resamplings.
    num_res_blocks: residual blocks per encoder stage (decoder stages have one more).
    attn_scales: must be empty: diffusers' and the original Wan encoder list attention
      blocks for these scales but cannot run them (they are called with the cache).
    temperal_downsample: per resampling, whether time is also halved (diffusers' spelling);
      the decoder uses it reversed.
    dropout: kept for config round trips; inference applies none.
    latents_mean, latents_std: per-channel statistics; `decode` takes normalised latents
      `(z - mean) / std` and `encode` returns them.
    is_residual: Wan2.2 residual down/up blocks (parameter-free space/time-to-depth
      shortcuts) instead of Wan2.1's plain stages.
    patch_size: Wan2.2 folds p x p pixel patches into channels before encoding (None: 1).
    in_channels, out_channels: channels after patching (video channels * p * p).
    scale_factor_temporal, scale_factor_spatial: compression ratios (must agree with
      temperal_downsample and dim_mult).
    param_dtype, dtype: weight and compute dtypes (the reference runs the VAE in float32).
  """

  base_dim: int = 96
  decoder_base_dim: Optional[int] = None
  z_dim: int = 16
  dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: Tuple[float, ...] = ()
  temperal_downsample: Tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0
  latents_mean: Tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: Tuple[float, ...] = WAN21_LATENTS_STD
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: Optional[int] = None
  scale_factor_temporal: int = 4
  scale_factor_spatial: int = 8
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = _ARCH_FIELDS
  FAMILY: ClassVar[str] = "Wan VAE"

  @classmethod
  def variants(cls):
    return {"wan2.1": cls}

  def __post_init__(self):
    def fix(name, value):
      object.__setattr__(self, name, value)

    for name, cast in (("dim_mult", int), ("attn_scales", float),
                       ("temperal_downsample", bool), ("latents_mean", float),
                       ("latents_std", float)):
      value = getattr(self, name)
      if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"WanVAEConfig.{name}={value!r}: expected a sequence")
      fix(name, tuple(cast(v) for v in value))
    fix("param_dtype", jnp.dtype(self.param_dtype))
    fix("dtype", jnp.dtype(self.dtype))
    if self.decoder_base_dim is None:
      fix("decoder_base_dim", self.base_dim)
    for name in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "in_channels",
                 "out_channels", "scale_factor_temporal", "scale_factor_spatial"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"WanVAEConfig.{name}={value!r}: must be an int >= 1")
    if not self.dim_mult or min(self.dim_mult) < 1:
      raise ValueError(f"WanVAEConfig.dim_mult={self.dim_mult}: need >= 1 multipliers >= 1")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"WanVAEConfig: temperal_downsample {self.temperal_downsample} needs "
                       f"one entry per resampling ({len(self.dim_mult) - 1})")
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"WanVAEConfig: latents_mean / latents_std need z_dim={self.z_dim} "
                       f"values, got {len(self.latents_mean)} / {len(self.latents_std)}")
    if min(self.latents_std) <= 0:
      raise ValueError(f"WanVAEConfig.latents_std must be > 0, got {self.latents_std}")
    if self.attn_scales:
      raise ValueError(f"WanVAEConfig.attn_scales={self.attn_scales}: only () is supported "
                       "(the reference encoder fails on attention blocks in its down path)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"WanVAEConfig.dropout={self.dropout}: must be in [0, 1)")
    if self.patch_size is not None and (isinstance(self.patch_size, bool) or
                                        not isinstance(self.patch_size, int) or
                                        self.patch_size < 1):
      raise ValueError(f"WanVAEConfig.patch_size={self.patch_size!r}: None or an int >= 1")
    p2 = (self.patch_size or 1) ** 2
    if self.in_channels % p2 or self.out_channels % p2:
      raise ValueError(f"WanVAEConfig: in_channels={self.in_channels} and out_channels="
                       f"{self.out_channels} must be multiples of patch_size**2={p2}")
    spatial = 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)
    temporal = 2 ** sum(self.temperal_downsample)
    if (self.scale_factor_spatial, self.scale_factor_temporal) != (spatial, temporal):
      raise ValueError(f"WanVAEConfig: scale_factor_spatial / _temporal = "
                       f"{self.scale_factor_spatial} / {self.scale_factor_temporal}, but "
                       f"dim_mult, patch_size and temperal_downsample give {spatial} / {temporal}")

  @classmethod
  def from_diffusers_config(cls, raw: Mapping[str, Any], **overrides) -> "WanVAEConfig":
    """From an `AutoencoderKLWan` config.json dict (`_*` bookkeeping keys ignored)."""
    if raw.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
      raise ValueError(f"not an AutoencoderKLWan config: _class_name={raw['_class_name']!r}")
    data = {k: v for k, v in raw.items()
            if not k.startswith("_") and k not in _IGNORED_DIFFUSERS_KEYS}
    return cls.from_dict(data, **overrides)

  def describe(self) -> str:
    return (f"Wan VAE (z_dim={self.z_dim}, base_dim={self.base_dim}, "
            f"dim_mult={list(self.dim_mult)}, num_res_blocks={self.num_res_blocks})")


@dataclasses.dataclass(frozen=True)
class WanVAETiling:
  """diffusers `enable_tiling` settings, in video pixels: tiles of min_height x min_width
  every stride pixels, blended linearly over the overlap (min - stride)."""

  tile_sample_min_height: int = 256
  tile_sample_min_width: int = 256
  tile_sample_stride_height: int = 192
  tile_sample_stride_width: int = 192

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"WanVAETiling.{f.name}={value!r}: must be an int >= 1")
    if (self.tile_sample_stride_height > self.tile_sample_min_height or
        self.tile_sample_stride_width > self.tile_sample_min_width):
      raise ValueError(f"WanVAETiling: strides must not exceed the tile size ({self})")


Cache = Any  # a pytree of arrays (None at the start of a video)


class RMSNorm(nnx.Module):
  """x / max(||x||_2, 1e-12) * sqrt(C) * gamma over channels (torch `WanRMS_norm`; the
  L2 normalisation runs in float32 for low-precision inputs).

  `torch_shape` is the shape of the checkpoint's gamma: `(C, 1, 1, 1)` for 3-D use,
  `(C, 1, 1)` for the per-frame attention norm.
  """

  def __init__(self, dim: int, *, images: bool = False, param_dtype=jnp.float32):
    self.scale = dim ** 0.5
    self.torch_shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
    self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., C] -> [..., C]
    xf = x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    normed = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
    return normed * self.scale * self.gamma[...].astype(x.dtype)


def _conv2d(cin: int, cout: int, k: int, cfg: WanVAEConfig, rngs: nnx.Rngs,
            **kw) -> nnx.Conv:
  """Per-frame Conv2d (torch weight (O, I, kH, kW) -> kernel (kH, kW, I, O)); applied to
  [B, T, H, W, C] it treats B and T as batch axes."""
  return nnx.Conv(cin, cout, (k, k), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  precision=matmul_precision(cfg.dtype), rngs=rngs, **kw)


def _causal(cin: int, cout: int, k, cfg: WanVAEConfig, rngs: nnx.Rngs, **kw) -> CausalConv3d:
  return CausalConv3d(cin, cout, k, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
                      **kw)


class ResidualBlock(nnx.Module):
  """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 conv) shortcut.

  Cache: (conv1, conv2) caches."""

  def __init__(self, in_dim: int, out_dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(in_dim, param_dtype=cfg.param_dtype)
    self.conv1 = _causal(in_dim, out_dim, 3, cfg, rngs, padding=1)
    self.norm2 = RMSNorm(out_dim, param_dtype=cfg.param_dtype)
    self.conv2 = _causal(out_dim, out_dim, 3, cfg, rngs, padding=1)
    self.conv_shortcut = _causal(in_dim, out_dim, 1, cfg, rngs) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    c1, c2 = (None, None) if cache is None else cache
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x, c1 = self.conv1.step(jax.nn.silu(self.norm1(x)), c1)
    x, c2 = self.conv2.step(jax.nn.silu(self.norm2(x)), c2)
    return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
  """Single-head self-attention within each frame over its H*W pixels (head dim = C),
  residual. No temporal mixing, so no cache."""

  def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.norm = RMSNorm(dim, images=True, param_dtype=cfg.param_dtype)
    self.to_qkv = _conv2d(dim, 3 * dim, 1, cfg, rngs)
    self.proj = _conv2d(dim, dim, 1, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> same
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    precision = matmul_precision(self.dtype)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=precision) / math.sqrt(c)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs, v, precision=precision)
    return x + self.proj(out.reshape(b, t, h, w, c))


class Resample(nnx.Module):
  """x2 spatial resampling, optionally with x2 in time (torch `WanResample`).

  upsample2d/3d: nearest x2 then 3x3 conv to `out_dim`; 3d first doubles time with a
  causal (3,1,1) conv to 2C channels whose halves become frames 2t and 2t+1 (skipped on
  the first chunk). downsample2d/3d: pad right/bottom by 1, 3x3 stride-2 conv; 3d then
  halves time with a (3,1,1) stride-2 conv over [last frame of the previous chunk, x]
  (on the first chunk it only records x).

  Cache: upsample3d: the time conv's 2-frame cache; downsample3d: the previous chunk's last
  frame [B, 1, H', W', C]; 2d modes: None.
  """

  MODES: ClassVar[Tuple[str, ...]] = ("upsample2d", "upsample3d", "downsample2d",
                                      "downsample3d")

  def __init__(self, dim: int, mode: str, cfg: WanVAEConfig, *, out_dim: Optional[int] = None,
               rngs: nnx.Rngs):
    if mode not in self.MODES:
      raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
    self.mode = mode
    if mode.startswith("upsample"):
      out_dim = dim // 2 if out_dim is None else out_dim
      self.resample = _conv2d(dim, out_dim, 3, cfg, rngs, padding=((1, 1), (1, 1)))
    else:
      self.resample = _conv2d(dim, dim, 3, cfg, rngs, strides=2, padding=((0, 1), (0, 1)))
    if mode == "upsample3d":
      self.time_conv = _causal(dim, 2 * dim, (3, 1, 1), cfg, rngs, padding=(1, 0, 0))
    elif mode == "downsample3d":
      self.time_conv = _causal(dim, dim, (3, 1, 1), cfg, rngs, stride=(2, 1, 1))
    else:
      self.time_conv = None

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    if self.mode == "upsample3d":
      b, t, h, w, c = x.shape
      if cache is None:  # diffusers' "Rep": no time doubling; later chunks see zeros
        cache = jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
      else:
        x, cache = self.time_conv.step(x, cache)
        x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
    if self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # = nearest-exact at exactly x2
    x = self.resample(x)
    if self.mode == "downsample3d":
      last = x[:, -1:]
      if cache is not None:
        x = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
      cache = last
    return x, cache


class MidBlock(nnx.Module):
  """resnets.0 -> attentions.0 -> resnets.1. Cache: the two residual blocks' caches."""

  def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, cfg, rngs=rngs)])

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    c0, c1 = (None, None) if cache is None else cache
    x, c0 = self.resnets[0](x, c0)
    x = self.attentions[0](x)
    x, c1 = self.resnets[1](x, c1)
    return x, (c0, c1)


class UpBlock(nnx.Module):
  """num_res_blocks + 1 residual blocks, then an optional upsampler (torch `WanUpBlock`).
  Cache: (residual block caches, upsampler cache)."""

  def __init__(self, in_dim: int, out_dim: int, mode: Optional[str], cfg: WanVAEConfig, *,
               rngs: nnx.Rngs):
    dims = [in_dim] + [out_dim] * cfg.num_res_blocks
    self.resnets = nnx.List([ResidualBlock(d, out_dim, cfg, rngs=rngs) for d in dims])
    self.upsamplers = (None if mode is None else
                       nnx.List([Resample(out_dim, mode, cfg, rngs=rngs)]))

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    res_caches, up_cache = ((None,) * len(self.resnets), None) if cache is None else cache
    new = []
    for block, c in zip(self.resnets, res_caches):
      x, c = block(x, c)
      new.append(c)
    if self.upsamplers is not None:
      x, up_cache = self.upsamplers[0](x, up_cache)
    return x, (tuple(new), up_cache)


class AvgDown3D(nnx.Module):
  """Parameter-free shortcut of a Wan2.2 down block: (t, h, w) sub-positions folded into
  channels (channel c * factor + sub-position), then groups of in * factor / out channels
  averaged. Time is zero-padded in front to a multiple of factor_t (a 1-frame chunk)."""

  def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
    factor = factor_t * factor_s * factor_s
    if in_dim * factor % out_dim:
      raise ValueError(f"AvgDown3D: in_dim {in_dim} * factor {factor} is not a multiple of "
                       f"out_dim {out_dim}")
    self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
    self.group = in_dim * factor // out_dim

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, H, W, C] -> [B, T', H', W', out]
    ft, fs = self.factor_t, self.factor_s
    pad_t = (ft - x.shape[1] % ft) % ft
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # [B, T', H', W', C, ft, fs, fs]
    x = x.reshape(b, t // ft, h // fs, w // fs, self.out_dim, self.group)
    return jnp.mean(x, axis=-1)


class DupUp3D(nnx.Module):
  """Parameter-free shortcut of a Wan2.2 up block: channels repeated out * factor / in
  times, then unfolded into (t, h, w) sub-positions (inverse layout of AvgDown3D). On the
  first chunk the first factor_t - 1 frames are dropped, as the upsampler makes 1 frame."""

  def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
    factor = factor_t * factor_s * factor_s
    if out_dim * factor % in_dim:
      raise ValueError(f"DupUp3D: out_dim {out_dim} * factor {factor} is not a multiple of "
                       f"in_dim {in_dim}")
    self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
    self.repeats = out_dim * factor // in_dim

  def __call__(self, x: jax.Array, first: bool) -> jax.Array:
    ft, fs = self.factor_t, self.factor_s
    b, t, h, w, _ = x.shape
    x = jnp.repeat(x, self.repeats, axis=-1).reshape(b, t, h, w, self.out_dim, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B, T, ft, H, fs, W, fs, out]
    x = x.reshape(b, t * ft, h * fs, w * fs, self.out_dim)
    return x[:, ft - 1:] if first else x


class ResidualDownBlock(nnx.Module):
  """Wan2.2 encoder stage: residual blocks and an optional downsampler, plus an AvgDown3D
  shortcut of the stage input. Cache: (residual block caches, downsampler cache)."""

  def __init__(self, in_dim: int, out_dim: int, temporal: bool, down: bool,
               cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
    dims = [in_dim] + [out_dim] * (cfg.num_res_blocks - 1)
    self.resnets = nnx.List([ResidualBlock(d, out_dim, cfg, rngs=rngs) for d in dims])
    mode = "downsample3d" if temporal else "downsample2d"
    self.downsampler = Resample(out_dim, mode, cfg, rngs=rngs) if down else None

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    res_caches, down_cache = ((None,) * len(self.resnets), None) if cache is None else cache
    shortcut = self.avg_shortcut(x)
    new = []
    for block, c in zip(self.resnets, res_caches):
      x, c = block(x, c)
      new.append(c)
    if self.downsampler is not None:
      x, down_cache = self.downsampler(x, down_cache)
    return x + shortcut, (tuple(new), down_cache)


class ResidualUpBlock(nnx.Module):
  """Wan2.2 decoder stage: residual blocks and an optional upsampler (keeping the width),
  plus a DupUp3D shortcut of the stage input. Cache: (residual caches, upsampler cache)."""

  def __init__(self, in_dim: int, out_dim: int, temporal: bool, up: bool, cfg: WanVAEConfig,
               *, rngs: nnx.Rngs):
    self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
    dims = [in_dim] + [out_dim] * cfg.num_res_blocks
    self.resnets = nnx.List([ResidualBlock(d, out_dim, cfg, rngs=rngs) for d in dims])
    mode = "upsample3d" if temporal else "upsample2d"
    self.upsampler = Resample(out_dim, mode, cfg, out_dim=out_dim, rngs=rngs) if up else None

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    first = cache is None
    res_caches, up_cache = ((None,) * len(self.resnets), None) if first else cache
    shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, first)
    new = []
    for block, c in zip(self.resnets, res_caches):
      x, c = block(x, c)
      new.append(c)
    if self.upsampler is not None:
      x, up_cache = self.upsampler(x, up_cache)
    if shortcut is not None:
      x = x + shortcut
    return x, (tuple(new), up_cache)


class Encoder(nnx.Module):
  """Video [B, T, H, W, in_channels] -> moments [B, T', H', W', 2 z_dim] (torch
  `WanEncoder3d`; `down_blocks` is Wan2.1's flat list of residual and resample layers, or
  one ResidualDownBlock per stage in Wan2.2). Cache: (conv_in, per down layer, mid block,
  conv_out)."""

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    self.conv_in = _causal(cfg.in_channels, dims[0], 3, cfg, rngs, padding=1)
    layers: List[nnx.Module] = []
    last = len(cfg.dim_mult) - 1
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if cfg.is_residual:
        down = i != last
        layers.append(ResidualDownBlock(in_dim, out_dim, down and cfg.temperal_downsample[i],
                                        down, cfg, rngs=rngs))
        continue
      for _ in range(cfg.num_res_blocks):
        layers.append(ResidualBlock(in_dim, out_dim, cfg, rngs=rngs))
        in_dim = out_dim
      if i != last:
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        layers.append(Resample(out_dim, mode, cfg, rngs=rngs))
    self.down_blocks = nnx.List(layers)
    self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], param_dtype=cfg.param_dtype)
    self.conv_out = _causal(dims[-1], 2 * cfg.z_dim, 3, cfg, rngs, padding=1)

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    c_in, c_down, c_mid, c_out = ((None, (None,) * len(self.down_blocks), None, None)
                                  if cache is None else cache)
    x, c_in = self.conv_in.step(x, c_in)
    new_down = []
    for layer, c in zip(self.down_blocks, c_down):
      x, c = layer(x, c)
      new_down.append(c)
    x, c_mid = self.mid_block(x, c_mid)
    x, c_out = self.conv_out.step(jax.nn.silu(self.norm_out(x)), c_out)
    return x, (c_in, tuple(new_down), c_mid, c_out)


class Decoder(nnx.Module):
  """Latents [B, T, h, w, z_dim] -> video [B, T', h', w', out_channels] (torch
  `WanDecoder3d`; in Wan2.1 stages after the first take half the channels, which the
  previous upsampler's conv produces; Wan2.2 uses ResidualUpBlocks at full width).
  Cache: (conv_in, mid block, per up block, conv_out)."""

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    mult = cfg.dim_mult
    dims = [cfg.decoder_base_dim * u for u in (mult[-1], *mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    self.conv_in = _causal(cfg.z_dim, dims[0], 3, cfg, rngs, padding=1)
    self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if cfg.is_residual:
        up = i != len(mult) - 1
        blocks.append(ResidualUpBlock(in_dim, out_dim, up and temperal_upsample[i], up, cfg,
                                      rngs=rngs))
        continue
      if i > 0:
        in_dim //= 2
      mode = None
      if i != len(mult) - 1:
        mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
      blocks.append(UpBlock(in_dim, out_dim, mode, cfg, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=cfg.param_dtype)
    self.conv_out = _causal(dims[-1], cfg.out_channels, 3, cfg, rngs, padding=1)

  def __call__(self, x: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    c_in, c_mid, c_up, c_out = ((None, None, (None,) * len(self.up_blocks), None)
                                if cache is None else cache)
    x, c_in = self.conv_in.step(x, c_in)
    x, c_mid = self.mid_block(x, c_mid)
    new_up = []
    for block, c in zip(self.up_blocks, c_up):
      x, c = block(x, c)
      new_up.append(c)
    x, c_out = self.conv_out.step(jax.nn.silu(self.norm_out(x)), c_out)
    return x, (c_in, c_mid, tuple(new_up), c_out)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, C, F, H, W] -> [B, C p p, F, H/p, W/p], channel c * p * p + pw * p + ph (the W
  offset before the H offset, as diffusers' `patchify`)."""
  if p == 1:
    return x
  b, c, f, h, w = x.shape
  if h % p or w % p:
    raise ValueError(f"height {h} and width {w} must be multiples of patch_size {p}")
  x = x.reshape(b, c, f, h // p, p, w // p, p).transpose(0, 1, 6, 4, 2, 3, 5)
  return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
  """Inverse of `patchify`: [B, C p p, F, H, W] -> [B, C, F, H p, W p]."""
  if p == 1:
    return x
  b, cp, f, h, w = x.shape
  x = x.reshape(b, cp // (p * p), p, p, f, h, w).transpose(0, 1, 4, 5, 3, 6, 2)
  return x.reshape(b, cp // (p * p), f, h * p, w * p)


def _decode_chunk(graphdef, state, latents, cache):
  TRACE_COUNTS["decode"] += 1
  return nnx.merge(graphdef, state).decode_chunk(latents, cache)


def _encode_chunk(graphdef, state, video, cache):
  TRACE_COUNTS["encode"] += 1
  return nnx.merge(graphdef, state).encode_chunk(video, cache)


# The cache is donated: each chunk's cache replaces the previous one, so its buffers are
# reused in place instead of both being alive (~4 GB more at 720p x 81 otherwise).
_decode_chunk_jit = jax.jit(_decode_chunk, static_argnums=0, donate_argnums=3)
_encode_chunk_jit = jax.jit(_encode_chunk, static_argnums=0, donate_argnums=3)


class WanVAE(nnx.Module):
  """Wan video VAE (diffusers `AutoencoderKLWan`): Wan2.1 or, with is_residual and
  patch_size 2, Wan2.2.

  `decode` takes the normalised latents a pipeline denoises and returns video in [-1, 1];
  `encode` returns normalised latent means (the I2V condition latents). Both run chunk by
  chunk in time through jitted per-chunk functions; `decode_chunk` / `encode_chunk` are
  those functions unjitted, for callers that stream.
  """

  def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.patch = cfg.patch_size or 1
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = _causal(2 * cfg.z_dim, 2 * cfg.z_dim, 1, cfg, rngs)
    self.post_quant_conv = _causal(cfg.z_dim, cfg.z_dim, 1, cfg, rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  @classmethod
  def from_pretrained(cls, path, *, dtype: Any = jnp.float32, progress: bool = False,
                      device: Optional[jax.Device] = None) -> "WanVAE":
    """Loads a local diffusers `AutoencoderKLWan` (a `vae/` folder, a pipeline folder holding
    one, or a safetensors file beside its config.json); see `models.wan.vae_convert.load_vae`."""
    from models.wan.vae_convert import load_vae

    return load_vae(path, dtype=dtype, progress=progress, device=device)

  def _stats(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / std) as [z] float32, computed as diffusers' pipelines do."""
    mean = np.asarray(self.config.latents_mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(self.config.latents_std, np.float32)
    return mean, inv_std

  def decode_chunk(self, latents: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    """One latent frame (or several) of a stream, de-normalised and decoded, unclamped and
    still patched (see `unpatchify`).

    Args:
      latents: [B, z_dim, T, h, w] normalised latents (`(z - mean) / std`).
      cache: the previous chunk's cache; None for the first chunk of a video.

    Returns:
      ([B, out_channels, T', h s / p, w s / p] (s = scale_factor_spatial, p = patch size)
      with T' = 1 + 4(T - 1) for the first chunk and 4T after, the next chunk's cache).
    """
    mean, inv_std = self._stats()
    shape = (1, -1, 1, 1, 1)
    z = latents.astype(self.config.dtype)
    z = z / inv_std.reshape(shape) + mean.reshape(shape)  # diffusers' op order
    x = self.post_quant_conv(vae_tiling.to_channels_last(z))
    x, cache = self.decoder(x, cache)
    return vae_tiling.to_channels_first(x), cache

  def encode_chunk(self, video: jax.Array, cache: Cache = None) -> Tuple[jax.Array, Cache]:
    """Posterior moments of one chunk of a stream (1 frame first, then 4 per chunk).

    Args:
      video: [B, in_channels / p^2, T, H, W] in [-1, 1] (p = patch size).
      cache: the previous chunk's cache; None for the first chunk.

    Returns:
      ([B, 2 z_dim, T', H/s, W/s] raw moments (mean channels then logvar channels), cache).
    """
    x = vae_tiling.to_channels_last(patchify(video.astype(self.config.dtype), self.patch))
    x, cache = self.encoder(x, cache)
    return vae_tiling.to_channels_first(self.quant_conv(x)), cache

  def _check(self, x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
      raise ValueError(f"WanVAE.{what}: expected [B, {channels}, F, H, W], got {x.shape}")

  def _decode_all(self, latents: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(self)
    latents = jnp.asarray(latents)
    frames, cache = [], None
    for i in range(latents.shape[2]):
      # A dynamic slice compiles once per input shape, a static one once per frame index.
      chunk = jax.lax.dynamic_slice_in_dim(latents, i, 1, axis=2)
      out, cache = _decode_chunk_jit(graphdef, state, chunk, cache)
      frames.append(out)
    return jnp.concatenate(frames, axis=2)

  def decode(self, latents: jax.Array, *, tiling: Optional[WanVAETiling] = None) -> jax.Array:
    """Normalised latents -> video, as `WanPipeline` + `AutoencoderKLWan.decode`.

    Args:
      latents: [B, z_dim, F_lat, h, w].
      tiling: spatial tiling settings (diffusers `enable_tiling`); used only when h or w
        exceeds the latent tile size, as in diffusers.

    Returns:
      [B, out_channels / p^2, 4 (F_lat - 1) + 1, h s, w s] in [-1, 1], `config.dtype`
      (s = scale_factor_spatial, p = patch size).
    """
    self._check(latents, self.config.z_dim, "decode")
    ratio = self.config.scale_factor_spatial
    _, _, _, h, w = latents.shape
    if tiling is not None and (h > tiling.tile_sample_min_height // ratio or
                               w > tiling.tile_sample_min_width // ratio):
      out = self._tiled_decode(latents, tiling)
    else:
      out = self._decode_all(latents)
    return jnp.clip(unpatchify(out, self.patch), -1.0, 1.0)

  def _tiled_decode(self, latents: jax.Array, tiling: WanVAETiling) -> jax.Array:
    ratio = self.config.scale_factor_spatial
    _, _, _, h, w = latents.shape
    tile_h = tiling.tile_sample_min_height // ratio
    tile_w = tiling.tile_sample_min_width // ratio
    stride_h = tiling.tile_sample_stride_height // ratio
    stride_w = tiling.tile_sample_stride_width // ratio
    if min(tile_h, tile_w, stride_h, stride_w) < 1:
      raise ValueError(f"WanVAETiling {tiling}: tiles and strides must be at least one latent "
                       f"pixel ({ratio} video pixels)")
    rows = [[self._decode_all(latents[:, :, :, i:i + tile_h, j:j + tile_w])
             for j in range(0, w, stride_w)] for i in range(0, h, stride_h)]
    p = self.patch  # tiles are blended before unpatchify: sizes in patches
    out = vae_tiling.blend_tiles(
        rows, tiling.tile_sample_min_height // p - tiling.tile_sample_stride_height // p,
        tiling.tile_sample_min_width // p - tiling.tile_sample_stride_width // p,
        tiling.tile_sample_stride_height // p, tiling.tile_sample_stride_width // p)
    return out[..., :h * ratio // p, :w * ratio // p]

  def encode_moments(self, video: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Raw posterior of `video`: (mean, logvar clipped to [-30, 20]), each
    [B, z_dim, 1 + (F - 1) / 4, H/s, W/s] (s = scale_factor_spatial), not normalised."""
    self._check(video, self.config.in_channels // self.patch ** 2, "encode")
    frames = video.shape[2]
    if (frames - 1) % 4:  # diffusers encodes 4 frames per chunk after the first
      raise ValueError(f"WanVAE.encode: the frame count must be 4k + 1, got {frames}")
    graphdef, state = nnx.split(self)
    video = jnp.asarray(video)
    chunks, cache = [], None
    for start, size in [(0, 1)] + [(s, 4) for s in range(1, frames, 4)]:
      chunk = jax.lax.dynamic_slice_in_dim(video, start, size, axis=2)
      out, cache = _encode_chunk_jit(graphdef, state, chunk, cache)
      chunks.append(out)
    moments = jnp.concatenate(chunks, axis=2)
    z = self.config.z_dim
    return moments[:, :z], jnp.clip(moments[:, z:], -30.0, 20.0)

  def encode(self, video: jax.Array) -> jax.Array:
    """Video -> normalised latent mean `(mu - mean) / std`, the posterior mode as
    `WanImageToVideoPipeline.prepare_latents` uses it (`retrieve_latents(...,
    sample_mode="argmax")`, then `(z - mean) * (1 / std)`).

    Args:
      video: [B, in_channels / p^2, F, H, W] in [-1, 1], F = 4k + 1 (p = patch size).

    Returns:
      [B, z_dim, k + 1, H/s, W/s] in `config.dtype` (s = scale_factor_spatial).
    """
    mu, _ = self.encode_moments(video)
    mean, inv_std = self._stats()
    shape = (1, -1, 1, 1, 1)
    return (mu - mean.reshape(shape)) * inv_std.reshape(shape)
