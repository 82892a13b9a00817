"""What the DiT configs (WanConfig, HunyuanConfig) share: copies, dtypes, the architecture
fingerprint used to recognise published variants, and the JSON round trip."""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp


class DiTConfigMixin:
  """Methods of a frozen DiT config dataclass.

  A subclass sets `ARCH_FIELDS` (the fields that define the checkpoint's tensors),
  `FAMILY` (model family name for messages) and `variants()` (published name -> factory),
  and has `param_dtype` / `dtype` fields.
  """

  ARCH_FIELDS: ClassVar[Tuple[str, ...]] = ()
  FAMILY: ClassVar[str] = ""

  @classmethod
  def variants(cls) -> Mapping[str, Callable[[], Any]]:
    raise NotImplementedError

  def replace(self, **changes):
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def with_dtype(self, dtype):
    """Same architecture with weights and compute in `dtype` (fp32 islands stay fp32)."""
    return self.replace(param_dtype=dtype, dtype=dtype)

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
