"""WanTransformer under Ulysses sequence parallelism (8 fake CPU devices, float32): equal to
the single-device forward, sharded as designed."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models.attention
import models.wan.transformer as wan_transformer
from models import AttentionPolicy, parallel
from models.wan import WanTransformer
from parallel_testing import Run, assert_state_equal, mesh, rel_err, shard_map_eqns
from svg_ear_jax import SvgEarConfig
from wan_testing import CHANNELS, random_jax_model, tiny_config

EAR = SvgEarConfig(routing="ear", num_q_clusters=4, num_k_clusters=8, kmeans_iters=4,
                   kmeans_iters_warm=2, implementation="xla")
SPARSE = AttentionPolicy.sparse(EAR, dense_layers=1)  # layer 0 dense, layer 1 SVG-EAR
HEADS = 4
ODD = (3, 14, 14)  # 3 x 7 x 7 = 147 tokens: padded to 148 on every mesh > 1
EVEN = (3, 16, 16)  # 192 tokens


def inputs(kind, fhw, batch=2, seed=0):
  """(latents, timestep, text); TI2V: per-token timesteps, first latent frame at t=0."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, CHANNELS[kind][0], *fhw), dtype=np.float32)
  ctx = rng.standard_normal((batch, 12, 16), dtype=np.float32)
  t = (500.0 - 100.0 * np.arange(batch)).astype(np.float32)
  if kind == "ti2v":
    per_frame = fhw[1] * fhw[2] // 4
    t = np.repeat(t[:, None], fhw[0] * per_frame, axis=1)
    t[:, :per_frame] = 0.0
  return x, t, ctx


def model(kind, policy=None, mesh=None, fsdp=False):
  m = random_jax_model(kind, num_heads=HEADS)
  m.set_attention(policy)
  if mesh is not None:
    m.set_mesh(mesh, fsdp=fsdp)
  return m


@pytest.fixture(scope="module")
def sparse_ref():
  """Single device, TI2V (per-token timesteps), 147 tokens: two calls (cold, warm)."""
  m = model("ti2v", SPARSE)
  xs = inputs("ti2v", ODD)
  return xs, Run(m, xs), Run(m, xs)


@pytest.fixture(scope="module")
def dense_ref():
  xs = inputs("t2v", EVEN)
  return xs, Run(model("t2v"), xs)


def test_sparse_seq4_padded_two_calls(sparse_ref):
  """4-way sequence parallel, 147 tokens (1 padding token), k-means state carried over two
  calls: outputs, centroids and densities equal the single-device ones."""
  xs, ref1, ref2 = sparse_ref
  m = model("ti2v", SPARSE, mesh(1, 4))
  run1, run2 = Run(m, xs), Run(m, xs)
  for run, ref in ((run1, ref1), (run2, ref2)):
    assert rel_err(run.out, ref.out) < 1e-5
    assert_state_equal(run.state, ref.state, P(None, None, parallel.SEQ))
    np.testing.assert_allclose(np.asarray(run.density), np.asarray(ref.density), atol=1e-6)
  # two self-attentions in the program (dense scan, SVG-EAR scan): 2 all-to-alls each, one
  # all-gather of the block stack's output, no other collective
  assert run1.count("all-to-all") == 4 and run2.count("all-to-all") == 4
  assert run1.count("all-gather") == 1
  assert run1.count("all-reduce") == 0 and run1.count("collective-permute") == 0


def test_sparse_data_x_seq_fsdp(sparse_ref):
  """2 (data: the batch) x 2 (seq) with FSDP-sharded block weights."""
  xs, ref1, _ = sparse_ref
  m = model("ti2v", SPARSE, mesh(2, 2), fsdp=True)
  kernel = m.blocks.attn1.to_q.kernel.get_value()  # [L, D, D]
  assert kernel.sharding.spec == P(None, (parallel.DATA, parallel.SEQ), None)
  assert kernel.addressable_shards[0].data.shape == (2, 16, 64)
  run = Run(m, xs)
  assert rel_err(run.out, ref1.out) < 1e-5
  assert_state_equal(run.state, ref1.state, P(None, parallel.DATA, parallel.SEQ))
  assert run.count("all-to-all") == 4
  assert run.count("all-gather") > 10  # every layer gathers its weights


def test_sparse_seq2(sparse_ref):
  xs, ref1, _ = sparse_ref
  run = Run(model("ti2v", SPARSE, mesh(1, 2)), xs)
  assert rel_err(run.out, ref1.out) < 1e-5
  assert_state_equal(run.state, ref1.state, P(None, None, parallel.SEQ))


def test_dense_seq2(dense_ref):
  """Dense attention, 192 tokens (no padding), scalar timesteps; the per-device temporaries
  of the compiled program halve."""
  xs, ref = dense_ref
  run = Run(model("t2v", mesh=mesh(1, 2)), xs)
  assert rel_err(run.out, ref.out) < 1e-5
  assert run.state is None and run.density is None
  assert run.count("all-to-all") == 2  # one scanned self-attention
  assert run.count("all-gather") == 1
  ratio = (run.compiled.memory_analysis().temp_size_in_bytes
           / ref.compiled.memory_analysis().temp_size_in_bytes)
  assert ratio < 0.65, ratio


def test_dense_mesh_of_one(dense_ref):
  xs, ref = dense_ref
  assert rel_err(Run(model("t2v", mesh=mesh(1, 1)), xs).out, ref.out) < 1e-5


def test_local_shapes(monkeypatch):
  """Inside the shard_map (a trace, no compile): tokens [B, S_pad/P, D] per device, the
  all-to-alls [3, B, S_pad/P, H, Dh] -> [3, B, S_pad, H/P, Dh] and back, and the attention
  cores see the unpadded sequence on H/P heads."""
  seen = []
  dense, svg = wan_transformer.dense_attention, models.attention.svg_ear_self_attention
  monkeypatch.setattr(wan_transformer, "dense_attention",
                      lambda q, k, v: seen.append(("dense", q.shape)) or dense(q, k, v))
  monkeypatch.setattr(models.attention, "svg_ear_self_attention",
                      lambda q, *a, **kw: seen.append(("svg", q.shape)) or svg(q, *a, **kw))
  m = model("ti2v", SPARSE, mesh(1, 4))
  shard_map, a2a = shard_map_eqns(m, inputs("ti2v", ODD))
  body = shard_map.params["jaxpr"]
  assert (2, 37, 64) in {tuple(v.aval.shape) for v in body.invars}  # x: 148 / 4 tokens
  # out: x all-gathered, centroids [L, B, H/P, K, D], density [L, B, H/P]
  assert [tuple(v.aval.shape) for v in body.outvars] == [
      (2, 148, 64), (1, 2, 1, 4, 16), (1, 2, 1, 8, 16), (1, 2, 1)]
  shapes = [(tuple(e.invars[0].aval.shape), tuple(e.outvars[0].aval.shape)) for e in a2a]
  assert shapes == [((3, 2, 37, 4, 16), (3, 2, 148, 1, 16)),
                    ((2, 148, 1, 16), (2, 37, 4, 16))] * 2
  assert seen == [("dense", (2, 147, 1, 16)), ("svg", (2, 147, 1, 16))]


def test_errors():
  cfg = tiny_config("t2v", num_heads=HEADS)
  with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by its size 3"):
    model("t2v").set_mesh(mesh(1, 3))
  with pytest.raises(ValueError, match=r"num_heads=4 .* size 3"):
    nnx.eval_shape(lambda: WanTransformer(cfg, mesh=mesh(1, 3)))
  with pytest.raises(ValueError, match="'seq' axis"):
    model("t2v").set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",)))
  m = model("t2v", mesh=mesh(2, 2))
  graphdef, state = nnx.split(m)
  with pytest.raises(ValueError, match=r"batch size 1 is not divisible .* 'data' axis size 2"):
    jax.eval_shape(lambda st, *a: nnx.merge(graphdef, st)(*a), state,
                   *inputs("t2v", EVEN, batch=1))


def test_set_mesh_none_restores_single_device(dense_ref):
  xs, ref = dense_ref
  m = model("t2v", mesh=mesh(1, 2))
  m.set_mesh(None)
  assert m.mesh is None and m.seq_parallel is None
  kernel = m.blocks.attn1.to_q.kernel.get_value()
  assert kernel.sharding.device_set == {jax.devices()[0]}
