"""What the model configs share: copies, dtypes, the architecture fingerprint used to
recognise published variants, and the JSON round trip (`DiTConfigMixin`: the DiT and VAE
configs, with `param_dtype` and `dtype`; `EncoderConfigMixin`: the text-encoder configs,
with one `dtype`)."""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np


class DiTConfigMixin:
  """Methods of a frozen DiT config dataclass.

  A subclass sets `ARCH_FIELDS` (the fields that define the checkpoint's tensors),
  `FAMILY` (model family name for messages) and `variants()` (published name -> factory),
  and has the `DTYPE_FIELDS` (`param_dtype` / `dtype`).
  """

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = ()
  DTYPE_FIELDS: ClassVar[Tuple[str, ...]] = ("param_dtype", "dtype")
  FAMILY: ClassVar[str] = ""

  @classmethod
  def variants(cls) -> Mapping[str, Callable[[], Any]]:
    raise NotImplementedError

  def replace(self, **changes):
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def with_dtype(self, dtype):
    """Same architecture with weights and compute in `dtype` (fp32 islands stay fp32)."""
    return self.replace(**{f: dtype for f in self.DTYPE_FIELDS})

  def dtypes(self) -> Dict[str, Any]:
    """The `DTYPE_FIELDS` and their values."""
    return {f: getattr(self, f) for f in self.DTYPE_FIELDS}

  def architecture(self) -> Dict[str, Any]:
    """The fields that determine the checkpoint's tensors."""
    return {f: getattr(self, f) for f in self.ARCH_FIELDS}

  def variant_name(self) -> Optional[str]:
    """Name of the published variant with this architecture, None for a custom one."""
    for name, factory in self.variants().items():
      if factory().architecture() == self.architecture():
        return name
    return None

  def to_dict(self) -> Dict[str, Any]:
    """JSON-serialisable fields (tuples as lists, dtypes by name)."""
    out = dataclasses.asdict(self)
    for key, value in out.items():
      if isinstance(value, tuple):
        out[key] = list(value)
      elif isinstance(value, jnp.dtype):
        out[key] = value.name
    return out

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], **overrides):
    """Inverse of `to_dict`; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**{**data, **overrides})


class EncoderConfigMixin(DiTConfigMixin):
  """`DiTConfigMixin` for a frozen text-encoder config with a single `dtype` field: every
  other field is architecture. A subclass sets `FAMILY`, `variants()` and `describe()`."""

  DTYPE_FIELDS: ClassVar[Tuple[str, ...]] = ("dtype",)

  def architecture(self) -> Dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in self.DTYPE_FIELDS}

  def check_positive_ints(self, names: Tuple[str, ...]) -> None:
    """ValueError naming the first of `names` that is not a positive integer (bools are
    not integers here)."""
    for name in names:
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got "
                         f"{value!r}")
