"""benchmarks/reference_peer.py on the CPU: --help, its errors without the reference, and one
run of the "tiny" shape against a pure-torch stand-in of the reference's API (the real one needs
CUDA, Triton and FlashInfer), which checks the script's plumbing and the JSON it writes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "reference_peer.py")


def _run(*args, timeout=120):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def test_help_works_without_torch_or_the_reference():
  proc = _run("--help")
  assert proc.returncode == 0, proc.stderr
  assert "--svg-path" in proc.stdout and "reference_peer_bundle.sh" in proc.stdout


def test_missing_svg_path_is_a_clear_error(tmp_path):
  proc = _run("--shapes", "tiny")
  assert proc.returncode == 2
  assert "--svg-path DIR is required" in proc.stderr and "Traceback" not in proc.stderr
  proc = _run("--svg-path", str(tmp_path))
  assert proc.returncode == 2
  assert "no svg/kmeans_utils.py" in proc.stderr and "Traceback" not in proc.stderr


def test_shapes_match_the_attention_benchmark():
  pytest.importorskip("jax")
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import reference_peer
  finally:
    sys.path.pop(0)
  from benchmarks import attention
  for name, shape in attention.SHAPES.items():
    g = shape.grid
    assert reference_peer.SHAPES[name] == ((g.frames, g.height, g.width), shape.heads,
                                           shape.head_dim, shape.num_q_clusters,
                                           shape.num_k_clusters)


# A stand-in with the reference's signatures and layouts, in plain torch on the CPU.
FAKE_KMEANS_UTILS = '''
import torch


def batch_kmeans_Euclid(x, n_clusters, max_iters=100, tol=1e-4, init_centroids=None, verbose=False):
  b, n, d = x.shape
  xf = x.float()
  c = (xf[:, torch.randint(0, n, (n_clusters,))] if init_centroids is None
       else init_centroids.float())
  for _ in range(max_iters):
    labels = torch.cdist(xf, c).argmin(-1)
    sums = torch.zeros(b, n_clusters, d).scatter_add_(1, labels[..., None].expand(-1, -1, d), xf)
    sizes = torch.zeros(b, n_clusters).scatter_add_(1, labels, torch.ones(b, n))
    c = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], c)
  return labels, c.to(x.dtype), sizes.to(torch.int32), max_iters


def scatter_mean_fused(src, size):
  c, h, l, d = src.shape
  out = torch.zeros(c, h, size.shape[-1], d, dtype=src.dtype)
  for i in range(c):
    for j in range(h):
      labels = torch.repeat_interleave(torch.arange(size.shape[-1]), size[i, j].long())
      sums = torch.zeros(size.shape[-1], d).index_add_(0, labels, src[i, j].float())
      out[i, j] = (sums / size[i, j].clamp(min=1)[:, None]).to(src.dtype)
  return out


def density_calculation(dynamic_map, q_cluster_sizes, k_cluster_sizes):
  area = q_cluster_sizes[:, :, :, None] * k_cluster_sizes[:, :, None, :]
  return (area * dynamic_map).sum(dim=(2, 3)) / area.sum(dim=(2, 3))


def identify_dynamic_map_estimated(q_perm, k_perm, v_perm, qc_sz, kc_sz, qcentroids, kcentroids,
                                   vcentroids, top_p=0.9, gamma=1.0, min_kc_ratio=0.0):
  logits = qcentroids.float() @ kcentroids.float().transpose(-1, -2)
  keep = max(1, int(round(top_p * logits.shape[-1])))
  top = logits.topk(keep, dim=-1).indices
  return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)


def dynamic_block_sparse_prune_fwd_flashinfer(q, k, v, k_centroids, v_centroids, block_mask_map,
                                              block_row_sz, block_col_sz, is_cpu=True):
  b, h, s, d = q.shape
  out = torch.empty_like(q)
  for i in range(b):
    for j in range(h):
      rows = torch.repeat_interleave(torch.arange(block_row_sz.shape[-1]),
                                     block_row_sz[i, j].long())
      cols = torch.repeat_interleave(torch.arange(block_col_sz.shape[-1]),
                                     block_col_sz[i, j].long())
      exact = block_mask_map[i, j][rows]
      logits = (q[i, j].float() @ k[i, j].float().T) * d ** -0.5
      logits = logits.masked_fill(~exact[:, cols], float("-inf"))
      pseudo = (q[i, j].float() @ k_centroids[i, j].float().T) * d ** -0.5
      pseudo = pseudo + torch.log(block_col_sz[i, j].float() + 1e-6)
      pseudo = pseudo.masked_fill(exact, float("-inf"))
      p = torch.softmax(torch.cat([logits, pseudo], -1), -1)
      out[i, j] = (p @ torch.cat([v[i, j].float(), v_centroids[i, j].float()])).to(q.dtype)
  return out
'''

FAKE_PERMUTE = '''
import torch


def permute_tensor_by_labels_triton(tensor, labels, dim, *, sorted_indices=None):
  b, h, s, d = tensor.shape
  idx = torch.argsort(labels, dim=-1) if sorted_indices is None else sorted_indices.long()
  idx = idx.reshape(b, h, s)
  return torch.gather(tensor, 2, idx[..., None].expand(-1, -1, -1, d)), idx.reshape(b * h, s)


def apply_inverse_permutation_triton(permuted_tensor, sorted_indices, dim):
  b, h, s, d = permuted_tensor.shape
  idx = sorted_indices.long().reshape(b, h, s)[..., None].expand(-1, -1, -1, d)
  return torch.empty_like(permuted_tensor).scatter_(2, idx, permuted_tensor)
'''

FAKE_TIMER = '''
ENABLE_LOGGING = False
operator_log_data = {}
'''

FAKE_FLASHINFER = '''
__version__ = "0.0.0+stand-in"


class _Wrapper:
  def plan(self, *args, **kwargs):
    pass

  def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer,
                             vector_sparse_indices_buffer=None, vector_sparse_indptr_buffer=None):
    pass


class sparse:
  VariableBlockSparseAttentionWrapper = _Wrapper
'''


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))


def _stand_in(tmp_path, flashinfer=FAKE_FLASHINFER):
  """(svg-path, site) of a plain-torch stand-in of the reference and of flashinfer."""
  svg, site = tmp_path / "svg-ref", tmp_path / "site"
  _write(svg / "svg" / "__init__.py", "")
  _write(svg / "svg" / "kmeans_utils.py", FAKE_KMEANS_UTILS)
  _write(svg / "svg" / "timer.py", FAKE_TIMER)
  _write(svg / "svg" / "kernels" / "triton" / "__init__.py", "")
  _write(svg / "svg" / "kernels" / "triton" / "permute.py", FAKE_PERMUTE)
  _write(site / "flashinfer" / "__init__.py", flashinfer)
  return svg, site


def test_tiny_run_with_a_stand_in_reference(tmp_path):
  pytest.importorskip("torch")
  svg, site = _stand_in(tmp_path)
  out = tmp_path / "rows.json"
  proc = _run("--svg-path", str(svg), "--site", str(site), "--shapes", "tiny", "--allow-cpu",
              "--iters", "1", "--warmup", "0", "--kmeans-iters-init", "3",
              "--match-density", "0.5", "--bisect-steps", "6", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(out.read_text())
  assert [r["name"] for r in rows] == ["tiny", "tiny"]
  assert rows[0]["budget"] == "top-p 0.9" and rows[1]["target_density"] == 0.5
  assert abs(rows[1]["density"] - 0.5) < 0.1 and rows[0]["density"] > rows[1]["density"]
  for r in rows:
    assert r["seq_len"] == 768 and r["heads"] == 2 and r["flashinfer"] == "0.0.0+stand-in"
    assert r["dense_ref"] == "math" and r["svg_ear_ms"] > 0 and 0 <= r["rel_err"] < 0.5
    assert r["timing"] == "wallclock" and r["merge_ms"] is None


def test_an_old_or_new_flashinfer_api_is_a_clear_error(tmp_path):
  pytest.importorskip("torch")
  old_api = FAKE_FLASHINFER.replace("vector_sparse_indices_buffer=None, ", "")
  svg, site = _stand_in(tmp_path, old_api)
  proc = _run("--svg-path", str(svg), "--site", str(site), "--shapes", "tiny", "--allow-cpu")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "takes no vector_sparse_indices_buffer" in proc.stderr
  proc = _run("--svg-path", str(svg), "--shapes", "tiny", "--allow-cpu")  # no --site: no flashinfer
  assert proc.returncode == 2 and "flashinfer does not import" in proc.stderr
