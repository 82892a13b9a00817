"""benchmarks/parallel.py in its CPU smoke mode (the GPU run is its own issue)."""

import json

from parallel_testing import need_devices


def test_parallel_benchmark_smoke(tmp_path):
  need_devices(2)
  from benchmarks import parallel as bench

  out = tmp_path / "parallel_smoke"
  assert bench.main(["--smoke", "--out", str(out)]) == 0
  rows = json.loads(out.with_suffix(".json").read_text())
  assert [(r["layout"], r["mesh"]) for r in rows] == [("seq", {"data": 1, "seq": 2}),
                                                      ("data_seq", {"data": 2, "seq": 1})]
  for r in rows:
    assert r["step_ms"] > 0 and r["compiled_gb_per_device"] > 0 and r["batch"] == 2
    assert r["tokens"] == 27 and r["policy"] == "dense"
  assert rows[0]["comm_ms"] > 0 and rows[1]["comm_ms"] is None  # seq 1: no all-to-all
  assert "| wan | dense | seq | 2 (1 x 2) |" in out.with_suffix(".md").read_text()
