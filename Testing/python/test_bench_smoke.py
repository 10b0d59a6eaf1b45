"""Smoke tests for the benchmarks in bench/: they import, run one tiny configuration, print a table.

No timing is asserted (times are the benchmarks' business); what is asserted is that each
benchmark still runs against the current engine and that its correctness checks catch a wrong
result, so the benchmarks cannot silently rot.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
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


def test_cluster_bench_tiny(bench, tmp_path):
    """The plain-batch row and the check (the Ray rows run the code test_cluster.py tests)."""
    bc = bench("bench_cluster")
    rows = bc.run(2, (32, 32, 24), cpus=1, repeats=1, warmup=0, rows=("plain batch",), scratch=tmp_path)
    assert [r["name"] for r in rows] == ["plain batch"] and rows[0]["cases"] == 2
    assert rows[0]["ok"] and rows[0]["case_s"] > 0 and rows[0]["overhead_ms"] is None
    assert rows[0]["check"] == f"ok (= plain batch at {torch.get_num_threads()} thread(s))"
    assert "| plain batch | 2 |" in bc.table(rows)
    run = {"wall": 1.0, "failed": [], "labels": {"a.nii.gz": np.zeros((2, 2, 2), np.uint8)},
           "rows": [{"status": "done", "elapsed_s": 0.4, "cpu_s": 0.7, "overhead_s": 0.01, "worker": "pid 1"}] * 2}
    row = bc.summarise("Ray, 1 worker", [run], {"a.nii.gz": np.ones((2, 2, 2), np.uint8)})
    assert row["check"] == "FAIL: labels differ" and not row["ok"]
    assert row["overhead_pct"] == pytest.approx(2.5) and row["fixed_s"] == pytest.approx(1.0 - 0.82)
    same = {"a.nii.gz": np.zeros((2, 2, 2), np.uint8)}
    row = bc.summarise("Ray, 2 workers", [run], same, baseline={"a.nii.gz": np.eye(2, dtype=np.uint8)[None].repeat(2, 0)},
                       threads=1)
    assert row["ok"] and row["check"] == "ok (= plain batch at 1 thread(s); 4 voxel(s) differ from the baseline's threads)"


def test_run_all_finds_every_benchmark(bench):
    ra = bench("run_all")
    found = [p.name for p in ra.benchmarks()]
    for name in ("bench_inference.py", "bench_io.py", "bench_models.py", "bench_deform_conv.py"):
        assert name in found
    for name in ("bench_inference.py", "bench_io.py", "bench_models.py", "bench_deform_conv.py", "bench_repux.py",
                 "bench_startup.py"):
        assert ra.accepts(ra.BENCH_DIR / name, "--quick"), name
    assert not ra.accepts(ra.BENCH_DIR / "bench_io.py", "--roi")


def test_command_line_helpers(bench, capsys):
    common = bench("common")
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, repeats=5, quick_help="tiny", threads=1, default_device="cpu")
    threads = torch.get_num_threads()
    try:
        args, device = common.start(parser, ["--quick"])
        assert torch.get_num_threads() == 1  # the benchmark's default thread count was applied
    finally:
        torch.set_num_threads(threads)
    assert device == torch.device("cpu") and args.repeats == 1 and args.threads == 1
    assert capsys.readouterr().out.startswith(f"torch {torch.__version__}, device cpu")
    args, _ = common.start(parser, ["--repeats", "2", "--threads", str(threads)])
    assert args.repeats == 2
    assert common.start(parser, [])[0].repeats == 5
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, device=False)
    assert common.start(parser, [])[1] == torch.device("cpu")
    capsys.readouterr()
    assert common.exit_status([{"name": "a", "ok": True}]) == 0
    assert capsys.readouterr().out == ""
    assert common.exit_status([{"name": "a", "ok": True}, {"name": "b", "ok": False}]) == 1
    assert "CORRECTNESS CHECK FAILED for: b" in capsys.readouterr().out
    assert not hasattr(common, "release_freed_memory")  # bench_repux uses the real name now


def test_timing_table_columns(bench):
    common = bench("common")
    timing = common.Timing(seconds=2.0, cpu_seconds=1.0, times=[2.0], peak_bytes=3 * common.MiB)
    assert common.timing_fields(timing) == {"seconds": 2.0, "cpu_seconds": 1.0, "peak_mib": 3.0}
    rows = [{"name": "base", **common.timing_fields(timing)},
            {"name": "other", "seconds": 4.0, "cpu_seconds": 0.5, "peak_mib": 6.0}]
    lines = common.timing_table(rows, [common.Column("name", "row"), *common.TIMING_COLUMNS]).splitlines()
    assert lines[0] == "| row | median s | time x base | CPU s | CPU x base | peak MiB | memory x base |"
    assert lines[3] == "| other | 4.000 | 2.00 | 0.50 | 0.50 | 6.0 | 2.00 |"
    assert common.timing_table(rows, [common.Column("name", "row"), *common.TIMING_COLUMNS],
                               baseline="other").splitlines()[2].startswith("| base | 2.000 | 0.50 |")


def test_deform_conv_bench_tiny(bench, monkeypatch):
    bd = bench("bench_deform_conv")
    torch.manual_seed(0)
    with torch.no_grad():
        rows = bd.stage_rows(8, 4, torch.device("cpu"), repeats=1, warmup=0)
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["F.conv3d (baseline)", "previous (reference)"]
    assert methods[2:] == ["deform_conv3d", "deform_conv3d (auto)"] or methods[2:] == ["deform_conv3d (auto)",
                                                                                        "deform_conv3d"]
    assert {r["chunk"] for r in rows[2:]} == {"1", "4"}
    assert all(r["ok"] for r in rows), [(r["diff"], r["zero_diff"]) for r in rows]
    assert rows[1]["speedup"] == 1.0 and all(r["peak_mib"] >= 0 and r["seconds"] > 0 for r in rows)
    assert all(r["no_ratio"] == ("peak_mib",) for r in rows)  # F.conv3d on 8x4^3 needs far less than 1 MiB
    text = bd.stage_table(rows)
    assert text.splitlines()[0].startswith("| stage (C, side) | method | chunk | median s | x conv3d |")
    assert "| (8, 4) | F.conv3d (baseline) | - |" in text
    assert bd.stage_table(rows, header=False).splitlines()[0].startswith("| (8, 4) |")
    # the check catches a deformable conv that no longer matches the previous implementation
    real = bd.deform_conv3d
    monkeypatch.setattr(bd, "deform_conv3d", lambda *a, **k: real(*a, **k) + 0.01)
    with torch.no_grad():
        wrong = bd.stage_rows(8, 4, torch.device("cpu"), repeats=1, warmup=0)
    assert [r["ok"] for r in wrong] == [True, True, False, False]


def test_deform_conv_and_repux_quick_runs(bench, capsys):
    bd = bench("bench_deform_conv")
    assert bd.main(["--quick", "--roi", "16", "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    assert "ROI 16^3" in out and "| (48, 8) | F.conv3d (baseline) |" in out and "| (384, 1) |" in out
    assert out.count("| stage (C, side) |") == 1  # one table over all stages
    br = bench("bench_repux")
    assert br.main(["--quick", "--roi", "16", "--ks", "5", "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torch ") and "centre-only, fast path | " in out and "| NO |" not in out


def test_startup_bench_tiny(bench, tmp_path):
    from dataclasses import replace

    bs = bench("bench_startup")
    every = bs.cases(tmp_path)
    assert every[0].name == bs.BASELINE and all(c.torch_free for c in every if c.name.startswith("refuse"))
    selected = [c for c in every if c.name in ("python (nothing imported)", "volseg --version")]
    rows = bs.run(selected, repeats=1, warmup=0)
    assert [r["check"] for r in rows] == ["ok (no torch)", "ok (no torch)"]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] >= 0 and r["peak_mib"] > 1 for r in rows)
    assert "| volseg --version |" in bs.table(rows)
    old = tmp_path / "old" / "VolSegSlicer"
    pairs = bs.compared(selected, old)
    assert [c.name for c in pairs] == ["python (nothing imported)", "volseg --version", "volseg --version [old]"]
    assert pairs[2].engine == old and pairs[2].argv == pairs[1].argv and not pairs[2].expect
    version = selected[1]
    assert bs.check(version, 0, "volseg 0.1.0", torch_imported=False) == (True, "ok (no torch)")
    assert bs.check(replace(version, exit_code=2), 0, "volseg 0.1.0", False)[1].startswith("FAIL: exit code")
    assert bs.check(version, 0, "usage: ...", False)[1].startswith("FAIL: output lacks")
    assert bs.check(version, 0, "volseg 0.1.0", torch_imported=True) == (False, "FAIL: imported torch")


def test_memory_bench_tiny(bench, capsys):
    bm = bench("bench_memory")
    args = ["--compare-size", "64", "64", "40", "--size", "72", "64", "40", "--threads", str(torch.get_num_threads())]
    assert bm.main(args) == 0
    out = capsys.readouterr().out
    assert "| one class at a time | 64x64x40 |" in out and "identical" in out and "full size (extrapolated)" in out


def test_official_bench_tiny_and_its_check(bench, capsys, monkeypatch):
    bo = bench("bench_official")
    args = ["--quick", "--arch", "segformer3d", "--runtimes", "torch", "--threads", str(torch.get_num_threads())]
    assert bo.main(args) == 0
    assert "| segformer3d: volseg torch |" in capsys.readouterr().out
    real = bo.predict
    monkeypatch.setattr(bo, "predict", lambda *a, **k: real(*a, **k) + 0.3)  # a fast but wrong path
    assert bo.main(args) == 1
    assert "CORRECTNESS CHECK FAILED" in capsys.readouterr().out


def test_server_bench_tiny(bench, capsys):
    """bench_server: one round, two clients, the demo model over a real local server; its check holds."""
    pytest.importorskip("fastapi", reason='the server is the [server] extra: pip install "volseg[server]"')
    pytest.importorskip("uvicorn", reason='the server is the [server] extra: pip install "volseg[server]"')
    bs = bench("bench_server")
    assert bs.main(["--quick", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "| server, 2 clients (per job) |" in out and "identical" in out and "DIFFERS" not in out


def test_official_bench_gpu_table_runs_its_logic_on_the_cpu(bench, capsys, monkeypatch):
    """The --device cuda table (official fp32 vs volseg's variants, stages, labels vs fp32), on CPU tensors."""
    bo = bench("bench_official")
    args = ["--quick", "--arch", "segformer3d", "--gpu-table-on-cpu", "--threads", str(torch.get_num_threads())]
    assert bo.main([*args, "--profile"]) == 0
    out = capsys.readouterr().out
    assert "profile of one call, official fp32:" in out and "profile of one call, volseg auto:" in out
    assert "aten::" in out  # the operators, by time
    for row in ("official fp32", "volseg auto", "volseg fp32", "volseg fp16", "volseg auto, channels-last"):
        assert f"| segformer3d: {row} |" in out
    assert "windows_and_blending" in out and "same labels as volseg fp32 %" in out
    real = bo.predict
    monkeypatch.setattr(bo, "predict", lambda *a, **k: 1.0 - real(*a, **k))  # labels flipped: must fail
    assert bo.main([*args, "--core-rows"]) == 1
    out = capsys.readouterr().out
    assert "CORRECTNESS CHECK FAILED" in out
    assert "| segformer3d: volseg auto |" in out and "volseg fp16" not in out  # --core-rows: official, auto, fp32


def test_stages_bench_tiny_and_its_check(bench, capsys, monkeypatch):
    """bench_stages: one tiny whole run of the demo card both ways and the way back alone; the
    agreement check fails when the torch way back gives another label map."""
    stages = bench("bench_stages")
    assert stages.main(["--quick", "--cards", "demo", "--slices", "6", "--back-slices", "6"]) == 0
    out = capsys.readouterr().out
    assert "| demo | baseline |" in out and "| demo | volseg |" in out and "The way back alone" in out
    monkeypatch.setattr(stages, "export_labelmap", lambda *a, **k: np.zeros((512, 512, 6), np.uint16))
    assert stages.main(["--quick", "--no-runs", "--back-slices", "6"]) == 1


def test_panel_bench_tiny(bench, capsys):
    """bench_panel: the demo card on the native CTChest4 through the module's runner on slicer-core."""
    pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra")
    bp = bench("bench_panel")
    assert bp.main(["--factor", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| panel overhead (export, poll, read, import) |" in out and "7 segments" in out


def _gpu_check(env_extra: dict) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_gpu_check_plan_reaches_every_network_within_eight_minutes_and_mednext_first():
    """The GPU check's default plan (a dry run, as on a GPU): the CUDA tests, each network's speed
    step with its own limit (MedNeXt first: it was never reached when one step ran all three), the
    stages; the limits add up to about 8 minutes."""
    run = _gpu_check({"GPU_CHECK_DRY": "1", "GPU_CHECK_MODE": "cuda", "GPU_CHECK_STEPS": ""})
    assert run.returncode == 0, run.stderr
    plan = [line.split()[1:3] for line in run.stdout.splitlines() if line.startswith("  plan: ")]
    assert [name for name, _ in plan] == ["tests", "speed-mednext", "speed-uxnet", "speed-segformer3d", "stages"]
    assert sum(int(limit.rstrip("s:")) for _, limit in plan) <= 500  # about 8 minutes
    assert "--arch mednext" in run.stdout and "test_cuda.py" in run.stdout
    picked = _gpu_check({"GPU_CHECK_DRY": "1", "GPU_CHECK_MODE": "cuda", "GPU_CHECK_STEPS": "stages speed-uxnet"})
    assert [line.split()[1] for line in picked.stdout.splitlines() if line.startswith("  plan: ")] == \
        ["speed-uxnet", "stages"]


def test_gpu_check_refuses_an_unknown_step_before_running_anything():
    run = _gpu_check({"GPU_CHECK_STEPS": "tests sped", "GPU_CHECK_DRY": ""})
    assert run.returncode == 2
    assert "unknown step 'sped'" in run.stderr and "speed-mednext" in run.stderr
    assert run.stdout == ""  # nothing ran


def test_window_overhead_bench_tiny_and_its_check(bench, capsys, monkeypatch):
    """bench_window_overhead: volseg's predict against MONAI + activation, bit for bit; a changed
    output fails the check."""
    wo = bench("bench_window_overhead")
    args = ["--quick", "--size", "40", "32", "32", "--threads", str(torch.get_num_threads())]
    assert wo.main(args) == 0
    out = capsys.readouterr().out
    assert "| tiny SegFormer3D, 2 flips | volseg predict |" in out and "DIFFERS" not in out
    real = wo.predict
    monkeypatch.setattr(wo, "predict", lambda *a, **k: real(*a, **k) * (1 + 1e-6))
    assert wo.main([*args, "--nets", "conv"]) == 1
    assert "CORRECTNESS CHECK FAILED" in capsys.readouterr().out


def test_gpu_check_step_cut_short_by_its_limit_is_reported_and_the_next_step_still_runs(tmp_path):
    run = _gpu_check({"GPU_CHECK_STEPS": "speed-uxnet tests", "GPU_CHECK_LIMIT_S": "2", "GPU_CHECK_DRY": "",
                      "GPU_CHECK_OUT": str(tmp_path)})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "speed-uxnet: exit 124" in run.stdout and "TIME LIMIT" in run.stdout
    assert "  tests: exit" in run.stdout  # the step after it ran
    assert "| speed-uxnet | TIMEOUT |" in run.stdout
