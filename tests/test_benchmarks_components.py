"""benchmarks/components.py: the --smoke run of every case (tiny configs, CPU), its
one-process-per-case path with the compilation-cache second pass, and the bookkeeping."""

import json

import pytest

from benchmarks import components

pytestmark = pytest.mark.benchmark_scripts

SMOKE_OUTPUTS = {  # (model, op, tiling) -> output shape at the smoke shapes
    ("wan2.1", "decode", "none"): [1, 3, 9, 32, 32],
    ("wan2.1", "decode", "spatial"): [1, 3, 9, 64, 64],
    ("wan2.2", "decode", "none"): [1, 3, 9, 32, 32],  # x16: patch 2 x VAE 8
    ("wan2.2", "decode", "spatial"): [1, 3, 9, 64, 64],
    ("hunyuan", "decode", "none"): [1, 3, 9, 32, 32],
    ("hunyuan", "decode", "temporal"): [1, 3, 17, 32, 32],
    ("hunyuan", "decode", "spatial"): [1, 3, 9, 64, 64],
    ("hunyuan", "decode", "spatial+temporal"): [1, 3, 17, 64, 64],
    ("wan2.1", "encode-image", "-"): [1, 16, 1, 8, 8],
    ("wan2.1", "encode-i2v", "-"): [1, 16, 3, 8, 8],
    ("umt5-xxl", "encode-b1", "-"): [1, 16, 32],
    ("umt5-xxl", "encode-b2", "-"): [2, 16, 32],
    ("llava-llama-3-8b", "encode-b1", "-"): [1, 16, 32],  # 16 + 8 tokens, the 8 cropped
    ("llava-llama-3-8b", "encode-b2", "-"): [2, 16, 32],
    ("clip-l", "encode-b1", "-"): [1, 32],  # pooled
    ("clip-l", "encode-b2", "-"): [2, 32],
}


def test_smoke_runs_every_case(tmp_path):
  out = str(tmp_path)
  # the VAEs and HunyuanVideo's encoders in this process, UMT5 in a child process (and a
  # second, cached one) merged in
  assert components.main(["--smoke", "--only", "vae-wan21,vae-wan22,vae-hunyuan,llama,clip",
                          "--out-dir", out]) == 0
  import jax  # the smoke run's compile setting is this process's again
  assert not jax.config.values["jax_disable_most_optimizations"]
  assert components.main(["--smoke", "--subprocess", "--clean-peak", "always", "--only",
                          "umt5", "--merge", "--out-dir", out]) == 0
  data = json.loads((tmp_path / "components_smoke.json").read_text())
  rows, meta = data["rows"], data["meta"]
  assert [r["case"] for r in rows] == [c.id for c in components.all_cases(["bf16"])
                                       for _ in range(2 if c.kind == "wan-encode" or
                                                      c.kind in components.ENCODER_KINDS
                                                      else 1)]
  assert {(r["model"], r["op"], r["tiling"]) for r in rows} == set(SMOKE_OUTPUTS)
  for r in rows:
    assert r["status"] == "ok", r
    assert r["output_shape"] == SMOKE_OUTPUTS[r["model"], r["op"], r["tiling"]], r["case"]
    assert r["output_finite"] and r["first_call_s"] > 0 and r["warm_s"] > 0
    assert r["params"] > 0 and r["weights_gb"] > 0 and r["jax_version"] == meta["jax_version"]
    assert r["dtype"] == "bf16" and r["output_dtype"] in ("bfloat16", "float32")
  # the tiled inputs split into tiles of the untiled input's shape: no new compiles
  assert [r["traces"] for r in rows if r["op"] == "decode"] == [2, 0, 2, 0, 1, 0, 0, 0]
  # the child's second pass found every compiled program in the persistent cache
  umt5 = [r for r in rows if r["section"] == "umt5"]
  assert all(r["clean_cache_requests"] > 0 and
             r["clean_cache_hits"] == r["clean_cache_requests"] for r in umt5)
  assert (tmp_path / "logs" / "umt5_encode-bf16.log").exists()
  assert meta["card"] == "cpu" and meta["preset"] == "smoke"
  assert meta["shapes"]["hunyuan/spatial+temporal"] == [1, 4, 5, 8, 8]
  llama = [r for r in rows if r["section"] == "llama"]
  assert [r["input_shape"] for r in llama] == [[1, 24], [2, 24]]
  assert all(r["traces"] is None and r["warm_ms"] > 0 for r in llama)
  md = (tmp_path / "components_smoke.md").read_text()
  assert all(c.id in md for c in components.all_cases(["bf16"]))


def test_full_size_hunyuan_attention_estimates():
  # tokens of the largest mid-block attention at 720p x 129 frames ([1, 16, 33, 90, 160])
  shape = components.SHAPES["full"]["hunyuan"]
  tokens = {t: components._hunyuan_attention_estimate(
      shape, components._hunyuan_tiling(t, smoke=False))["attention_tokens"]
            for t in ("none", "temporal", "spatial", "spatial+temporal")}
  assert tokens == {"none": 33 * 90 * 160, "temporal": 5 * 90 * 160, "spatial": 33 * 32 * 32,
                    "spatial+temporal": 5 * 32 * 32}
  untiled = components._hunyuan_attention_estimate(shape, None)
  assert untiled["mask_host_gb"] > 200  # cannot run: the host mask alone is 226 GB


def test_peak_prefers_the_cached_second_process():
  cold = dict(case="c", op="decode", status="ok", peak_after_first_call_gb=90.0,
              peak_after_warm_gb=90.0)
  clean = dict(case="c", op="decode", status="ok", peak_after_first_call_gb=70.0,
               cache_requests=5, cache_hits=5, first_call_s=1.0)
  row = components._finish(cold, clean)
  assert row["peak_gb"] == 70.0 and row["peak_incl_compile_gb"] == 90.0
  assert row["fits_h100_80gb"] and row["peak_source"].startswith("second")
  # a compile that missed the cache: the clean pass autotuned too, keep the first peak
  row = components._finish(cold, dict(clean, cache_hits=4))
  assert row["peak_gb"] == 90.0 and not row["fits_h100_80gb"]
  assert row["peak_second_process_gb"] == 70.0


def test_case_selection():
  cases = components.all_cases(["bf16", "f32"])
  assert len({c.id for c in cases}) == len(cases)
  picked = components.select(cases, "umt5,vae-wan22/decode-none-f32")
  assert [c.id for c in picked] == ["vae-wan22/decode-none-f32", "umt5/encode-bf16",
                                    "umt5/encode-f32"]
  with pytest.raises(SystemExit):
    components.select(cases, "vae-wan23")
