import pytest

from svg_ear_jax import SvgEarConfig

pytestmark = pytest.mark.split_cases


def test_defaults_and_presets():
  cfg = SvgEarConfig()
  assert (cfg.num_q_clusters, cfg.num_k_clusters, cfg.kmeans_iters, cfg.kmeans_iters_warm) == (
      300, 1000, 50, 2)
  assert (cfg.routing, cfg.compensation, cfg.top_p, cfg.min_kc_ratio, cfg.density) == (
      "ear", "variance", 0.9, 0.05, None)
  assert cfg.implementation == "auto" and cfg.seed == 0 and cfg.kmeans_tol == 1e-4
  assert cfg.attention_kernel == "auto"
  assert cfg.num_guaranteed == 50 and cfg.num_budget_floor == 100
  assert SvgEarConfig.hunyuan_720p().num_q_clusters == 400
  assert SvgEarConfig.wan22_720p(density=0.25).density == 0.25
  assert hash(cfg) == hash(SvgEarConfig())


def test_frozen():
  with pytest.raises(Exception):
    SvgEarConfig().top_p = 0.5


@pytest.mark.parametrize("field,value", [
    ("num_q_clusters", 0), ("num_k_clusters", -3), ("num_k_clusters", 2.5),
    ("kmeans_iters", 0), ("kmeans_iters_warm", 0), ("kmeans_tol", -1.0),
    ("routing", "topk"), ("compensation", 1), ("compensation", "Mean"),
    ("compensation", None), ("compensation", "second_moment"), ("top_p", 0.0), ("top_p", 1.5),
    ("min_kc_ratio", -0.1), ("min_kc_ratio", 2.0), ("gamma", -1.0), ("density", 0.0),
    ("density", 1.2), ("density", True), ("implementation", "cuda"), ("seed", 1.0),
    ("attention_kernel", "cuda"), ("attention_kernel", None),
    ("xla_chunk_mb", 0), ("num_q_clusters", True),
])
def test_invalid_field_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    SvgEarConfig(**{field: value})


def test_replace_validates():
  with pytest.raises(ValueError, match="top_p"):
    SvgEarConfig().replace(top_p=2.0)
  assert SvgEarConfig().replace(routing="topp").routing == "topp"


def test_zero_min_kc_ratio_has_no_floor():
  cfg = SvgEarConfig(min_kc_ratio=0.0)
  assert cfg.num_guaranteed == 0 and cfg.num_budget_floor == 0


@pytest.mark.parametrize("given,mode", [(True, "mean"), (False, "none"), ("none", "none"),
                                        ("mean", "mean"), ("variance", "variance")])
def test_compensation_accepts_strings_and_booleans(given, mode):
  cfg = SvgEarConfig(compensation=given)
  assert cfg.compensation == mode
  # normalised on creation: the boolean and string spellings are one static jit argument
  assert cfg == SvgEarConfig(compensation=mode) and hash(cfg) == hash(SvgEarConfig(
      compensation=mode))
  assert cfg.replace(top_p=0.8).compensation == mode


def test_bad_compensation_message_lists_the_modes():
  with pytest.raises(ValueError, match="compensation.*'none', 'mean', 'variance'"):
    SvgEarConfig(compensation="var")
