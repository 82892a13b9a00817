import json

import jax
import numpy as np
import pytest

from benchmarks import quality, workloads

pytestmark = pytest.mark.benchmark_scripts


def test_workloads_are_seeded_and_shaped():
  grid = workloads.Grid(2, 4, 6)
  a = workloads.structured(grid, heads=3, head_dim=16, seed=1)
  b = workloads.structured(grid, heads=3, head_dim=16, seed=1)
  c = workloads.structured(grid, heads=3, head_dim=16, seed=2)
  assert all(x.shape == (1, 48, 3, 16) for x in a)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])
  assert workloads.WAN_720P.seq_len == 75_600 and workloads.HUNYUAN_720P.seq_len == 118_800


def test_rope_is_a_rotation():
  grid = workloads.Grid(3, 4, 5)
  x = np.random.default_rng(0).normal(size=(grid.seq_len, 2, 24))
  y = workloads.rope_3d(x, grid.coords())
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
  np.testing.assert_allclose(y[0], x[0])  # position (0, 0, 0) is not rotated


def test_quality_sweep_writes_results_and_ear_wins(tmp_path):
  assert quality.main(["--preset", "demo", "--workloads", "structured", "--densities", "0.2",
                       "--no-plot", "--out-dir", str(tmp_path)]) == 0
  data = json.loads((tmp_path / "quality_demo.json").read_text())
  assert len(data["rows"]) == 2 * len(quality.METHODS)
  assert quality.check_ear_wins(data["rows"]) == []
  assert "SVG-EAR has a lower error" in data["meta"]["verdict"]
  # the second-moment rows are there and beat the paper's compensation
  ratios = data["meta"]["variance_over_mean"]
  assert set(ratios) == {"structured 0.20", "structured top-p 0.9"}
  assert max(ratios.values()) < 1.0 and "lower at every budget" in data["meta"]["verdict"]


def test_quality_demo_leaves_the_committed_results_alone(tmp_path, monkeypatch):
  # README's main job writes under out/ by default, never over benchmarks/results/
  monkeypatch.chdir(tmp_path)
  assert quality.main(["--preset", "demo", "--workloads", "random", "--densities", "0.2",
                       "--no-plot", "--probe-study"]) == 0
  assert (tmp_path / "out" / "quality" / "quality_demo.md").exists()
  assert not (tmp_path / "benchmarks").exists()
  rows = json.loads((tmp_path / "out" / "quality" / "quality_demo.json").read_text())["rows"]
  assert {r["method"] for r in rows} == set(quality.METHODS) | {quality.PROBE_STUDY}
  assert quality.matching_density(rows, "random") is None  # one density: nothing to match


def test_model_benchmark_tiny(tmp_path):
  from benchmarks import model
  assert model.main(["--model", "wan", "--preset", "tiny", "--iters", "1",
                     "--out", str(tmp_path / "m")]) == 0
  rows = json.loads((tmp_path / "m.json").read_text())
  assert [r["policy"] for r in rows] == ["dense", "svg_ear_0.25"]
  assert rows[1]["mean_sparse_density"] is not None and rows[0]["speedup_vs_dense"] == 1.0
  assert rows[0]["peak_mem_gb"] > rows[0]["weights_gb"] > 0


def test_model_benchmark_merges_policies_and_peer(tmp_path):
  # one policy per process, merged into one file, with the diffusers peer's JSON
  from benchmarks import model
  peer = tmp_path / "peer.json"
  peer.write_text(json.dumps({"framework": "diffusers", "forward_ms": 1.0}))
  common = ["--model", "hunyuan", "--preset", "tiny", "--iters", "1", "--out",
            str(tmp_path / "h"), "--peer-json", str(peer)]
  assert model.main(common + ["--policies", "svg_ear_0.25"]) == 0
  assert model.main(common + ["--policies", "dense", "--merge"]) == 0
  rows = json.loads((tmp_path / "h.json").read_text())
  assert [r["policy"] for r in rows] == ["dense", "svg_ear_0.25"]
  assert rows[1]["speedup_vs_dense"] == rows[0]["forward_ms"] / rows[1]["forward_ms"]
  assert rows[0]["speedup_vs_diffusers"] == 1.0 / rows[0]["forward_ms"]
  assert "diffusers dense forward" in (tmp_path / "h.md").read_text()
  with pytest.raises(SystemExit):
    model.main(common + ["--policies", "sparse"])


@pytest.mark.benchmark_kernels
def test_kernel_benchmark_smoke(tmp_path, monkeypatch):
  # benchmarks/kernels.py in interpret mode on tiny shapes: every measurement line is
  # written and no variant errors (the H100 sweep runs the same code at full size)
  from benchmarks import kernels
  log = tmp_path / "log.jsonl"
  monkeypatch.setattr(kernels, "_LOG", str(log))
  monkeypatch.setattr("sys.argv", ["kernels", "smoke", "600"])
  kernels.main()
  lines = [json.loads(x) for x in log.read_text().splitlines()]
  runs = [x for x in lines if x["what"] in ("sparse", "sparse_index", "inputs")]
  assert len(runs) == 2 + 1 + 3 and not [x for x in runs if "error" in x]
  assert all(x["max_diff_vs_first"] < 2e-3 for x in runs if "max_diff_vs_first" in x)
  assert all(x["max_err_vs_f32_rows"] < 2e-3 for x in runs if x["what"] == "sparse")
  mosaic = [x for x in lines if x["what"] == "mosaic"]
  assert [x["chunk_rows"] for x in mosaic] == [16, 8] and not [x for x in mosaic if "error" in x]
  assert all(x["max_diff_vs_triton"] < 2e-2 and x["useful_tflops"] > 0 for x in mosaic)
  assert [x["half_tiles"] for x in mosaic] == [True, False]
  assert [x["slot_output"] for x in mosaic] == [False, True]
  assert mosaic[0]["half_tile_share"] > 0 and mosaic[1]["half_tile_share"] == 0
  clean = [x for x in lines if x["what"] == "clean_steps"]
  assert [(x["split_producers"], x["variant"]) for x in clean] == [
      (True, "clean"), (True, "every_step_biased"), (False, "clean"),
      (False, "every_step_biased")]
  assert all(x["max_diff_vs_triton"] < 2e-2 for x in clean)
  share = [x for x in lines if x["what"] == "clean_share"]
  assert len(share) == 2 and 0 < share[0]["clean_steps"] < share[0]["exact_steps"]
  probe = [x for x in lines if x["what"] == "probe"]
  assert [x["cluster_splits"] for x in probe] == [1, 3] and not [x for x in probe if "error" in x]
  assign = [x for x in lines if x["what"] == "assign"]
  assert [x["block_n"] for x in assign] == [16, 32] and not [x for x in assign if "error" in x]
  assert all(x["q_mismatches"] == 0 and x["k_mismatches"] == 0 for x in assign)
  assert probe[1]["max_diff_vs_first"] == 0.0
  calls = [x for x in lines if x["what"] == "head_calls"]
  assert [(x["heads_per_call"], x["calls_heads"]) for x in calls] == [(2, 2), (None, 2), (1, 1)]
  assert all(x["max_diff_vs_one_call"] < 1e-5 and x["mem_gb"] > 0 for x in calls)


def test_attention_benchmark_smoke(tmp_path):
  # benchmarks/attention.py on the tiny shape with the XLA path: rows with and without
  # the per-stage timings (--no-stages: NaN there, "-" in the table), written after each
  from benchmarks import attention
  for extra in ([], ["--no-stages"]):
    stem = str(tmp_path / ("attn" + "".join(extra)))
    assert attention.main(["--shapes", "tiny", "--implementation", "xla", "--iters", "1",
                           "--compensations", "mean", "variance", "--out", stem] + extra) == 0
    rows = json.loads(open(stem + ".json").read())
    assert [r["compensation"] for r in rows] == ["mean", "variance"]
    assert all(0 < r["rel_err"] < 0.5 and r["peak_mem_gb"] > 0 for r in rows)
    staged = [np.isfinite(r["kmeans_ms"]) and np.isfinite(r["attention_ms"]) for r in rows]
    assert staged == [not extra] * 2
    table = open(stem + ".md").read()
    assert table.count("| tiny |") == 2 and (" - |" in table) == bool(extra)


def test_breakdown_needs_a_gpu_and_formats_stages(capsys):
  from benchmarks import breakdown
  if jax.default_backend() != "gpu":
    assert breakdown.main(["--shape", "tiny"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
  result = dict(device="dev", jax_version="0", shape="tiny", seq_len=768, heads=2, head_dim=64,
                num_q_clusters=12, num_k_clusters=40, routing="ear", density=0.25,
                stages=[dict(stage="cluster", launches=3, total_ms=1.5,
                             kernels=[("assign", 2, 1.0), ("scatter", 1, 0.5)])])
  text = breakdown.markdown(result, top=1)
  assert "| cluster | 3 | 1.50 |" in text and "| `assign` | 2 | 1.000 |" in text
  assert "scatter" not in text  # top=1 keeps the slowest kernel only


def test_generate_benchmark_tiny(tmp_path):
  from benchmarks import generate

  out = str(tmp_path / "gen")
  assert generate.main(["steps", "--resolution", "tiny", "--settings", "dense", "mean_0.25",
                        "--out", out]) == 0
  rows = {r["setting"]: r for r in json.load(open(out + ".json"))}
  assert rows["dense"]["video_s"] == pytest.approx(40 * rows["dense"]["step_ms_warm"] / 1e3)
  sparse = rows["mean_0.25"]
  want = (8 * rows["dense"]["step_ms_warm"] + 2 * sparse["step_ms_cold"]
          + 30 * sparse["step_ms_warm"]) / 1e3
  assert sparse["video_s"] == pytest.approx(want)
  assert 0 < sparse["density"] < 1 and rows["dense"]["density"] == 1
  assert "| tiny | mean_0.25 |" in open(out + ".md").read()


def test_generate_settings_and_carry_accounting():
  import argparse

  from benchmarks import generate

  assert generate.setting_name("variance_0.12") == "variance_0.12"
  for bad in ("variance_0", "mean_1.5", "median_0.2", "variance_x"):
    with pytest.raises(argparse.ArgumentTypeError, match="a setting is"):
      generate.setting_name(bad)
  dense = dict(resolution="720p", setting="dense", step_ms_warm=20_000.0)
  rows = [dense] + [dict(resolution="720p", setting="variance_0.12", step_ms_cold=13_000.0,
                         step_ms_warm=10_000.0, expert_switch=switch)
                    for switch in ("cold", "carry")]
  rows = generate.video_seconds(rows)
  assert rows[0]["video_s"] == pytest.approx(800.0)
  assert rows[1]["video_s"] == pytest.approx((8 * 20 + 2 * 13 + 30 * 10))  # two cold starts
  assert rows[2]["video_s"] == pytest.approx((8 * 20 + 1 * 13 + 31 * 10))  # carry: one
  assert rows[2]["speedup_vs_dense"] == pytest.approx(800.0 / 483.0)


def test_other_weights_workload_and_kmeans_start_study(tmp_path, monkeypatch):
  from benchmarks import kmeans_start

  grid = workloads.Grid(2, 4, 8)
  plain = workloads.structured(grid, 2, 16)
  for a, b in zip(plain, workloads.structured(grid, 2, 16, other_weights=0.0)):
    np.testing.assert_array_equal(a, b)
  corr = [np.corrcoef(plain[0].ravel(), workloads.structured(
      grid, 2, 16, other_weights=w)[0].ravel())[0, 1] for w in (0.25, 1.0)]
  assert 0.5 < corr[0] < 0.999 and abs(corr[1]) < 0.5
  with pytest.raises(ValueError, match="other_weights"):
    workloads.structured(grid, 2, 16, other_weights=1.5)

  tiny = quality.Preset(grid, heads=2, head_dim=16, num_q_clusters=4, num_k_clusters=8,
                        densities=(0.3,), implementation="xla")
  monkeypatch.setitem(quality.PRESETS, "tiny", tiny)
  out = str(tmp_path / "ks")
  assert kmeans_start.main(["--preset", "tiny", "--density", "0.3", "--cold-iters", "1", "4",
                            "--alphas", "0", "1", "--switch-iters", "3", "--repeats", "1",
                            "--out", out]) == 0
  rows = json.load(open(out + ".json"))
  assert [r["start"] for r in rows] == ["cold 1", "cold 4"] + ["carry 2", "carry 3",
                                                               "cold 3", "cold 4"] * 2
  assert all(np.isfinite(r["rel_err"]) and 0 < r["rel_err"] < 1 for r in rows)
  # the same inputs and the same cold start give the same error, in either study
  assert rows[1]["rel_err"] == pytest.approx(rows[5]["rel_err"])
  assert "| switch | 1.00 | carry 2 |" in open(out + ".md").read()
  with pytest.raises(SystemExit):
    kmeans_start.main(["--preset", "tiny", "--alphas", "2"])


def test_summarize_trace_exclusive_shares():
  # benchmarks/kernels.py trace: a Mosaic GPU profiler trace summed per warpgroup role
  # and scope, nested ranges counted in their own name only
  from benchmarks import kernels

  def ranges(tid, spans):
    out = []
    for name, b, e in spans:
      out += [dict(name=name, ph="B", ts=b, tid=tid), dict(name=name, ph="E", ts=e, tid=tid)]
    return out

  events = []
  for cta in range(2):  # 3 warpgroups per CTA: tids 1 + wg + 3 * cta
    base = 100.0 * cta
    events += ranges(1 + 3 * cta, [("qk", base, base + 4), ("softmax", base + 4, base + 9),
                                   ("qk", base + 10, base + 12)])
    # consumer 1: "pv" holds a nested "wait_k" of 3: pv's exclusive time is 6 - 3
    events += [dict(name="pv", ph="B", ts=base, tid=2 + 3 * cta),
               dict(name="wait_k", ph="B", ts=base + 2, tid=2 + 3 * cta),
               dict(name="wait_k", ph="E", ts=base + 5, tid=2 + 3 * cta),
               dict(name="pv", ph="E", ts=base + 6, tid=2 + 3 * cta)]
    events += ranges(3 + 3 * cta, [("issue_k", base, base + 1), ("wait_k_used", base + 1,
                                                                   base + 8)])
  got = kernels.summarize_trace({"traceEvents": events[::-1]}, warpgroups=3, space=3)
  c0, c1, prod = got["consumer 0"], got["consumer 1"], got["producer"]
  assert c0["ctas"] == c1["ctas"] == prod["ctas"] == 2
  assert c0["ranges"] == 3 and c0["full"] == 1 and c1["full"] == 0
  assert c0["span"] == 12 and c0["scopes"]["qk"]["total"] == 6
  assert c0["scopes"]["qk"]["count"] == 2 and c0["scopes"]["softmax"]["share"] == 5 / 12
  assert abs(c0["unscoped"] - 1 / 12) < 1e-12
  assert c1["scopes"]["pv"]["total"] == 3 and c1["scopes"]["wait_k"]["total"] == 3
  assert list(prod["scopes"]) == ["wait_k_used", "issue_k"]  # largest first
  assert prod["scopes"]["wait_k_used"]["share"] == 7 / 8 and abs(prod["unscoped"]) < 1e-12


_PTX_STAGE = """\
	wgmma.fence.sync.aligned;
	{ wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1,%r2}, %rd1, %rd2, p; }
	add.s64 	%rd3, %rd1, 2;
	mov.b32 	%r9, %r20;
	{REDEF}
	{ wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r5,%r6}, {%r10,%r11}, %rd3; }
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 1;
	{CAST}
	wgmma.wait_group.sync.aligned 0;
	cvt.rn.bf16x2.f32 	%r10, %r7, %r8;
"""


def test_ptx_stages_finds_definitions_of_wgmma_inputs_inside_a_stage(capsys, tmp_path):
  from benchmarks import ptx_stages
  # clean: descriptors (64-bit) and other registers defined between the wgmmas, the A
  # operand redefined only after the last wait
  clean = _PTX_STAGE.replace("{REDEF}", "").replace("{CAST}", "mul.f32 \t%r30, %r1, %r2;")
  assert ptx_stages.stage_hazards(clean) == []
  # the next wgmma's accumulator set between the two, then fenced: no warning from ptxas;
  # not fenced: listed
  init = lambda fence: _PTX_STAGE.replace("{CAST}", "").replace(
      "{REDEF}", "mov.b32 \t%r5, %r40;" + ("\n\twgmma.fence.sync.aligned;" if fence else ""))
  assert ptx_stages.stage_hazards(init(True)) == []
  [(_, _, [unfenced])] = ptx_stages.stage_hazards(init(False))
  assert (unfenced.register, unfenced.line, unfenced.wgmma_line) == ("%r5", 5, 6)
  # a copy into the second wgmma's A operand after the first wgmma, and a cast into it
  # (guarded) while that wgmma is in flight: both are the C7513 pattern
  bad = _PTX_STAGE.replace("{REDEF}", "mov.b32 \t%r10, %r21;").replace(
      "{CAST}", "@%p1 cvt.rn.bf16x2.f32 \t%r11, %r7, %r8;")
  [(start, end, found)] = ptx_stages.stage_hazards(bad)
  assert (start, end) == (2, 10)
  assert [(h.line, h.register, h.wgmma_line) for h in found] == [(5, "%r10", 6),
                                                                 (9, "%r11", 6)]
  path = tmp_path / "k.ptx"
  path.write_text(bad)
  ptx_stages.main([str(path)])
  out = capsys.readouterr().out
  assert "stage at lines 2-10: 2 definitions" in out and "line 9: @%p1 cvt" in out
  path.write_text(clean)
  ptx_stages.main([str(path)])
  assert "no non-wgmma definition" in capsys.readouterr().out
