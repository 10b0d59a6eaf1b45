"""Smoke tests for the benchmarks in bench/: they import, run one tiny configuration, print a table.

No timing is asserted (times are the benchmarks' business); what is asserted is that each
benchmark still runs against the current engine and that its correctness checks catch a wrong
result, so the benchmarks cannot silently rot.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench(repo_root: Path):
    folder = str(repo_root / "bench")
    sys.path.insert(0, folder)
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def test_table_ratios_against_named_baseline(bench):
    common = bench("common")
    rows = [{"name": "a", "t": 2.0, "m": 4.0}, {"name": "base", "t": 1.0, "m": 8.0},
            {"name": "gpu", "t": 0.5, "m": 1.0, "no_ratio": ("m",)}, {"name": "none", "t": None, "m": 2.0}]
    cols = [common.Column("name", "row"), common.Column("t", "s", "{:.1f}"), common.Column("m", "MiB", "{:.0f}")]
    text = common.markdown_table(rows, cols, baseline="base", ratio_of=[("t", "t x"), ("m", "m x")])
    lines = text.splitlines()
    assert lines[0] == "| row | s | t x | MiB | m x |"
    assert lines[2] == "| a | 2.0 | 2.00 | 4 | 0.50 |"
    assert lines[3] == "| base | 1.0 | 1.00 | 8 | 1.00 |"
    assert lines[4] == "| gpu | 0.5 | 0.50 | 1 | n/a |"
    assert lines[5] == "| none | - | - | 2 | 0.25 |"
    with pytest.raises(ValueError, match="baseline"):
        common.markdown_table(rows, cols, baseline="missing")


def test_measure_keeps_result_and_counts_calls(bench):
    common = bench("common")
    calls = []
    timings = common.measure_interleaved([(lambda: calls.append("a") or "A", "cpu"),
                                          (lambda: calls.append("b") or "B", "cpu")], repeats=2, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up each, interleaved timed rounds, one memory call each
    assert [t.result for t in timings] == ["A", "B"]
    assert all(len(t.times) == 2 and t.seconds >= 0 and t.peak_bytes >= 0 for t in timings)
    with common.PeakRSS() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert mem.grown > 32 * 2**20 and block.sum() > 0


def test_inference_bench_tiny(bench):
    bi = bench("bench_inference")
    rows, what = bi.run("segformer3d", roi=(32, 32, 32), size=(32, 32, 48), repeats=1, warmup=0, only=3)
    assert "synthetic" in what
    assert [r["name"] for r in rows][1:] == ["sw_batch_size 2", "sw_batch_size 4"]
    assert all(r["ok"] for r in rows), [r["check"] for r in rows]
    assert [r["windows"] for r in rows] == [2, 2, 2]  # counted at the network: windows at 0 and 16 along 48
    assert "| baseline (sw 1, overlap 0.5, constant) |" in bi.table(rows)
    # the check catches a result that differs from the baseline where it must not
    case = bi.build_cases((32, 32, 32), cuda=False)[1]
    probs = torch.full((3, 4, 4, 4), 1 / 3)
    assert bi.check(probs, probs, case) == (True, "ok (= baseline)")
    other = torch.tensor([0.5, 0.25, 0.25])[:, None, None, None].expand(3, 4, 4, 4)  # valid, but different
    assert bi.check(other, probs, case)[1].startswith("FAIL: differs from baseline")
    assert bi.check(probs * 2, probs, case)[1].startswith("FAIL: class sums")  # not probabilities


def test_io_bench_tiny(bench):
    bio = bench("bench_io")
    rows = bio.run(size=(32, 24, 12), repeats=1, warmup=0)
    assert rows[0]["name"] == "NRRD read"
    assert {r["name"] for r in rows} == {f"{f} {op}" for f in ("NRRD", "NIfTI", "MHA", "seg.nrrd")
                                         for op in ("read", "write")}
    assert all(r["ok"] for r in rows), [r["check"] for r in rows]
    assert "| NRRD read |" in bio.table(rows)
    image, labels = bio.phantom((32, 24, 12))
    assert set(np.unique(labels)) == set(range(8))  # all 7 labels present
    written = bio.reference_grid(image)
    changed = written.with_array(image + 1)
    assert bio._check_volume(changed, written) == "FAIL: voxels differ"


def test_models_bench_tiny(bench):
    bm = bench("bench_models")
    cases = bm.tiny_cases(names=["segformer3d_small.pt"])
    rows = bm.run(cases, torch.device("cpu"), repeats=1, warmup=0)
    assert [r["name"] for r in rows] == ["MONAI UNet (baseline)", "segformer3d (v2024)"]
    assert all(r["ok"] for r in rows), [r["check"] for r in rows]
    assert rows[1]["check"].startswith("ok (golden")
    assert "| MONAI UNet (baseline) |" in bm.table(rows)
    wrong = cases[1]
    wrong.expected = wrong.expected + 1.0
    with torch.inference_mode():
        assert bm.check(wrong, wrong.net(wrong.x))[1].startswith("FAIL: relative error")


def test_published_cases_follow_manifests(bench):
    bm = bench("bench_models")
    with torch.device("meta"):  # shapes and parameter counts only, no memory
        cases = bm.published_cases(32)
    names = [c.name for c in cases]
    assert names[0] == "MONAI UNet (baseline)" and "uxnet" in names and "deformuxnet_source (source)" in names
    for case in cases[1:]:
        assert bm.n_params(case.net) == case.expected_params, case.name


def test_run_all_finds_every_benchmark(bench):
    ra = bench("run_all")
    found = [p.name for p in ra.benchmarks()]
    for name in ("bench_inference.py", "bench_io.py", "bench_models.py", "bench_deform_conv.py"):
        assert name in found
    assert ra.accepts(ra.BENCH_DIR / "bench_models.py", "--quick")
    assert not ra.accepts(ra.BENCH_DIR / "bench_deform_conv.py", "--quick")
