"""Direct NumPy (float64) transcriptions of ALGORITHM.md, written independently of the JAX
code: loops over heads, clusters and tokens, no shared helpers. Small inputs only."""

import numpy as np


def kmeans(x, init, iters, tol):
  """2(a) for one head: x [N, D], init [K, D] -> labels, centroids, sizes."""
  c = np.array(init, np.float64)
  x = np.asarray(x, np.float64)
  labels = sizes = None
  for _ in range(iters):
    d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    labels = d.argmin(-1)
    new = c.copy()
    sizes = np.zeros(len(c), np.int64)
    for j in range(len(c)):
      members = x[labels == j]
      sizes[j] = len(members)
      if len(members):
        new[j] = members.mean(0)
    shift = np.sqrt(((new - c) ** 2).sum(-1)).max()
    if shift < tol:
      break
    c = new
  return labels, c, sizes


def _top_p_keep(p_sorted, top_p, floor):
  keep = np.zeros(len(p_sorted), bool)
  c = np.cumsum(p_sorted)
  for r in range(len(p_sorted)):
    # top_p = 1 means every cluster, even where rounding pushes the cumsum above 1
    keep[r] = r == 0 or c[r - 1] <= top_p or top_p >= 1.0 or r < floor
  return keep


def topp_map(qc, kc, k_sizes, scale, top_p, floor):
  """2(c) for one head: qc [Kq, D], kc [Kk, D], k_sizes [Kk] -> bool [Kq, Kk]."""
  out = np.zeros((len(qc), len(kc)), bool)
  for i in range(len(qc)):
    s = kc @ qc[i] * scale
    w = k_sizes * np.exp(s - s.max())
    p = w / w.sum()
    order = np.argsort(-p, kind="stable")
    out[i, order] = _top_p_keep(p[order], top_p, floor)
  return out


def block_error(qc, k, v, k_labels, kc, vc, scale, logit_offset=None):
  """E_ij = sum_{t in C_j} ||e^{a_t} v_t - e^{c_ij} vbar_j||^2, directly (no expansion);
  logit_offset [Kq, Kk] is added to c_ij (the pseudo-token's logit correction)."""
  err = np.zeros((len(qc), len(kc)))
  for i in range(len(qc)):
    for j in range(len(kc)):
      c_ij = qc[i] @ kc[j] * scale
      if logit_offset is not None:
        c_ij += logit_offset[i, j]
      for t in np.nonzero(k_labels == j)[0]:
        a_t = qc[i] @ k[t] * scale
        err[i, j] += ((np.exp(a_t) * v[t] - np.exp(c_ij) * vc[j]) ** 2).sum()
  return err


def ear_map(qc, kc, q_sizes, k_sizes, err, scale, top_p, min_kc_ratio, gamma, density=None):
  """2(e) for one head -> bool [Kq, Kk]."""
  kq, kk = len(qc), len(kc)
  num_keys = k_sizes.sum()
  guaranteed_n = max(1, int(min_kc_ratio * kk)) if min_kc_ratio > 0 else 0
  floor = max(1, int(2 * min_kc_ratio * kk)) if min_kc_ratio > 0 else 0
  out = np.zeros((kq, kk), bool)
  for i in range(kq):
    area = q_sizes[i] * k_sizes.astype(np.float64)
    logits = kc @ qc[i] * scale + np.log(k_sizes + 1e-8)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if density is None:
      keep = _top_p_keep(p[order], top_p, floor)
      budget = area[order][keep].sum()
    else:
      budget = density * q_sizes[i] * num_keys
    guaranteed = np.zeros(kk, bool)
    guaranteed[order[:guaranteed_n]] = True
    remaining = max(budget - area[guaranteed].sum(), 0.0)
    score = np.log(np.maximum(err[i], 1e-8)) - gamma * np.log(np.maximum(area, 1e-8))
    score[guaranteed] = -1e10
    order = np.argsort(-score, kind="stable")
    spent = 0.0
    for j in order:
      if spent < remaining:
        out[i, j] = True
      spent += area[j]
    out[i] |= guaranteed
  return out


def compensated_attention(q, k, v, q_labels, k_labels, block_map, kc, vc, k_sizes, scale,
                          compensation=True, k_variance=None, k_radius=None):
  """2(d) for one head, token by token: one softmax over exact keys and pseudo-tokens;
  with k_variance [Kk, D] and k_radius [Kk], the pseudo-token logits get section 9's
  min(0.5 scale^2 sum_d q_d^2 var_jd, scale ||q|| r_j)."""
  out = np.zeros((len(q), v.shape[1]))
  for s in range(len(q)):
    logits, values = [], []
    row = block_map[q_labels[s]]
    for t in range(len(k)):
      if row[k_labels[t]]:
        logits.append(q[s] @ k[t] * scale)
        values.append(v[t])
    if compensation:
      for j in range(len(kc)):
        if not row[j] and k_sizes[j] > 0:
          corr = 0.0
          if k_variance is not None:
            second = 0.5 * scale ** 2 * sum(q[s, d] ** 2 * k_variance[j, d]
                                            for d in range(len(q[s])))
            corr = min(second, scale * np.sqrt((q[s] ** 2).sum()) * k_radius[j])
          logits.append(q[s] @ kc[j] * scale + np.log(k_sizes[j]) + corr)
          values.append(vc[j])
    if logits:
      logits = np.array(logits)
      w = np.exp(logits - logits.max())
      out[s] = (w[:, None] * np.array(values)).sum(0) / w.sum()
  return out
