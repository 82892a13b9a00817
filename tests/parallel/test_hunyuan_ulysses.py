"""HunyuanVideoTransformer under Ulysses sequence parallelism (8 fake CPU devices, float32):
video tokens sharded, text tokens replicated; equal to the single-device forward."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models.attention
from models import AttentionPolicy, parallel
from models.hunyuan import HunyuanVideoTransformer
from hunyuan_testing import PROMPT_LEN, random_jax_model, tiny_config
from parallel_testing import Run, assert_state_equal, mesh, rel_err, shard_map_eqns
from svg_ear_jax import SvgEarConfig

pytestmark = pytest.mark.split_cases

EAR = SvgEarConfig(routing="ear", num_q_clusters=4, num_k_clusters=8, kmeans_iters=4,
                   kmeans_iters_warm=2, implementation="xla")
SPARSE = AttentionPolicy.sparse(EAR)  # the double and the single block both SVG-EAR
SIZE = dict(num_heads=4, num_layers=1, num_single_layers=1)
ODD = (3, 14, 14)  # 3 x 7 x 7 = 147 video tokens: padded to 148 on every mesh > 1
EVEN = (3, 16, 16)  # 192 video tokens
TEXT = 10


def inputs(fhw, batch=2, seed=0):
  """(latents, timestep, text, text mask, pooled, guidance); sample b has PROMPT_LEN[b]
  valid text tokens, then padding (masked keys)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, *fhw), dtype=np.float32)
  text = rng.standard_normal((batch, TEXT, 16), dtype=np.float32)
  mask = np.zeros((batch, TEXT), np.int64)
  for b in range(batch):
    mask[b, :PROMPT_LEN[b % len(PROMPT_LEN)]] = 1
  pooled = rng.standard_normal((batch, 8), dtype=np.float32)
  t = (500.0 - 100.0 * np.arange(batch)).astype(np.float32)
  return x, t, text, mask, pooled, np.full((batch,), 6000.0, np.float32)


def model(policy=None, mesh=None, fsdp=False):
  m = random_jax_model(attention=policy, **SIZE)
  if mesh is not None:
    m.set_mesh(mesh, fsdp=fsdp)
  return m


@pytest.fixture(scope="module")
def sparse_ref():
  """Single device, 147 video + 10 text tokens: two calls (cold, warm)."""
  m = model(SPARSE)
  xs = inputs(ODD)
  return xs, Run(m, xs), Run(m, xs)


@pytest.fixture(scope="module")
def dense_ref():
  xs = inputs(EVEN)
  return xs, Run(model(), xs)


def test_sparse_seq4_padded_two_calls(sparse_ref):
  """4-way sequence parallel, 147 video tokens (1 padding token) + replicated text, state
  carried over two calls: outputs, centroids and densities equal the single-device ones."""
  xs, ref1, ref2 = sparse_ref
  m = model(SPARSE, mesh(1, 4))
  run1, run2 = Run(m, xs), Run(m, xs)
  for run, ref in ((run1, ref1), (run2, ref2)):
    assert rel_err(run.out, ref.out) < 1e-5
    assert_state_equal(run.state, ref.state, P(None, None, parallel.SEQ))
    np.testing.assert_allclose(np.asarray(run.density), np.asarray(ref.density), atol=1e-6)
  # two joint attentions in the program (double, single): per attention 2 all-to-alls (video
  # q|k|v in, video out back) and 1 all-gather (text rows); 1 all-gather of the output
  assert run1.count("all-to-all") == 4 and run2.count("all-to-all") == 4
  assert run1.count("all-gather") == 3
  assert run1.count("all-reduce") == 0 and run1.count("collective-permute") == 0


def test_sparse_data_x_seq_fsdp(sparse_ref):
  xs, ref1, _ = sparse_ref
  m = model(SPARSE, mesh(2, 2), fsdp=True)
  kernel = m.single_transformer_blocks.proj_mlp.kernel.get_value()  # [L, D, mlp]
  assert kernel.sharding.spec == P(None, None, (parallel.DATA, parallel.SEQ))
  assert kernel.addressable_shards[0].data.shape == (1, 48, 48)  # mlp 192 / 4
  run = Run(m, xs)
  assert rel_err(run.out, ref1.out) < 1e-5
  assert_state_equal(run.state, ref1.state, P(None, parallel.DATA, parallel.SEQ))
  assert run.count("all-to-all") == 4


def test_sparse_seq2(sparse_ref):
  xs, ref1, _ = sparse_ref
  run = Run(model(SPARSE, mesh(1, 2)), xs)
  assert rel_err(run.out, ref1.out) < 1e-5
  assert_state_equal(run.state, ref1.state, P(None, None, parallel.SEQ))


@pytest.mark.parametrize("seq", [1, 2])
def test_dense(dense_ref, seq):
  xs, ref = dense_ref
  run = Run(model(mesh=mesh(1, seq)), xs)
  assert rel_err(run.out, ref.out) < 1e-5
  assert run.state is None


def test_local_shapes(monkeypatch):
  """Inside the shard_map (a trace): video tokens [B, S_pad/P, D] per device, text whole;
  the all-to-alls move only the video rows; the attention core sees exactly the
  single-device [147 video | 10 text] sequence on H/P heads, text as the dense tail."""
  seen = []
  svg = models.attention.svg_ear_self_attention

  def spy(q, *a, num_dense_tokens=0, key_mask=None, head_ids=None):
    seen.append((q.shape, num_dense_tokens, key_mask.shape, head_ids.shape))
    return svg(q, *a, num_dense_tokens=num_dense_tokens, key_mask=key_mask, head_ids=head_ids)

  monkeypatch.setattr(models.attention, "svg_ear_self_attention", spy)
  shard_map, a2a = shard_map_eqns(model(SPARSE, mesh(1, 4)), inputs(ODD))
  local = {tuple(v.aval.shape) for v in shard_map.params["jaxpr"].invars}
  assert (2, 37, 48) in local and (2, TEXT, 48) in local  # video shard, whole text
  shapes = [(tuple(e.invars[0].aval.shape), tuple(e.outvars[0].aval.shape)) for e in a2a]
  assert shapes == [((3, 2, 37, 4, 12), (3, 2, 148, 1, 12)),
                    ((2, 148, 1, 12), (2, 37, 4, 12))] * 2
  assert seen == [((2, 147 + TEXT, 1, 12), TEXT, (2, 147 + TEXT), (2, 1))] * 2


def test_errors():
  with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by its size 3"):
    model().set_mesh(mesh(1, 3))
  with pytest.raises(ValueError, match=r"num_heads=4 .* size 3"):
    nnx.eval_shape(lambda: HunyuanVideoTransformer(tiny_config(**SIZE), mesh=mesh(1, 3)))
  m = model(mesh=mesh(2, 1))
  graphdef, state = nnx.split(m)
  with pytest.raises(ValueError, match=r"batch size 1 is not divisible"):
    jax.eval_shape(lambda st, *a: nnx.merge(graphdef, st)(*a), state, *inputs(EVEN, batch=1))
