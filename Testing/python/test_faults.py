"""Faults around a run (issue 8): a signal at every stage, in the first second and during the
write; a full disk, no inodes, a read-only file system; concurrent writers; a killed worker.

The promise under test: a signal at any moment gives exit code 130, a JSON error event with
``--progress json`` and no output (once outputs are committed the run finishes and says so);
a disk problem is one line naming the user's path, with the disk class's exit code.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_card
from volseg.cli.main import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and file-system faults")

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
STAGES = ["read", "load_model", "preprocess", "infer", "postprocess", "write"]


@pytest.fixture
def case(tmp_path, threshold_torchscript):
    a = np.full((12, 10, 8), -1000, np.int16)
    a[:6, :5, :4] = 800
    image = sitk.GetImageFromArray(a)
    image.SetSpacing((1.5, 1.5, 3.0))
    volume = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(volume))
    scale = {"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}
    card = make_card(tmp_path, "faults", preprocessing=[scale])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["segment", str(volume), "--model", str(card), "--checkpoint", str(threshold_torchscript),
            "-o", str(out_dir / "seg.nrrd"), "--progress", "json"]
    return args, out_dir


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _launch(args: list[str], pause: str, marker: Path, seconds: float = 60) -> subprocess.Popen:
    env = {**ENV, "VOLSEG_TEST_PAUSE": pause, "VOLSEG_TEST_MARKER": str(marker),
           "VOLSEG_TEST_PAUSE_SECONDS": str(seconds)}
    return subprocess.Popen([sys.executable, str(HERE / "fault_launcher.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=env)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before the pause point: {proc.communicate()}"
        assert time.monotonic() < deadline, "the pause point was never reached"
        time.sleep(0.02)


def _assert_cancelled(proc: subprocess.Popen, out_dir: Path) -> None:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    last = _events(stdout)[-1]
    assert last["event"] == "error" and last["exit_code"] == 130 and "cancelled" in last["message"]
    assert stderr == ""
    assert list(out_dir.iterdir()) == []  # no output, no staging folder, no temporary file


@pytest.mark.parametrize("point,sig", [*[(f"stage:{s}", signal.SIGTERM) for s in STAGES],
                                       ("mid-write", signal.SIGTERM), ("mid-write", signal.SIGINT),
                                       ("import", signal.SIGTERM)])
def test_a_signal_at_every_stage_cancels_with_nothing_written(case, tmp_path, point, sig):
    args, out_dir = case
    marker = tmp_path / "marker"
    proc = _launch(args, point, marker)
    _wait_for(marker, proc)
    proc.send_signal(sig)
    _assert_cancelled(proc, out_dir)


def test_a_signal_after_the_commit_began_lets_the_run_finish(case, tmp_path):
    args, out_dir = case
    marker = tmp_path / "marker"
    proc = _launch(args, "commit", marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, (stdout, stderr)
    assert _events(stdout)[-1]["event"] == "done"
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.csv", "seg.nrrd"]


def _handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM (Linux: the SigCgt mask in /proc)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in text.splitlines() if line.startswith("SigCgt:"))
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("when", ["handler installed", "1 s"])
def test_a_signal_in_the_first_second_is_a_clean_cancel(case, when):
    """From the moment volseg's first line has run (``volseg/__main__.py`` installs the handler
    before importing anything heavy) a signal is a clean cancel. Before it, only the interpreter
    and its site packages are starting: nothing can be written, and the process ends with -15."""
    args, out_dir = case
    proc = subprocess.Popen([sys.executable, "-m", "volseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    if when == "1 s":
        time.sleep(1.0)
    else:
        if not Path(f"/proc/{proc.pid}/status").exists():
            proc.kill()
            pytest.skip("needs /proc to see when the handler is installed")
        deadline = time.monotonic() + 60
        while not _handles_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _assert_cancelled(proc, out_dir)


def test_concurrent_writers_never_clobber_each_other(case, tmp_path):
    args, out_dir = case
    procs = [_launch(args, "mid-write", tmp_path / f"marker{i}", seconds=1.5) for i in range(2)]
    results = [(p, *p.communicate(timeout=120)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, out, err) for p, out, err in results]
    loser = next(out for p, out, _ in results if p.returncode == 2)
    assert "exists" in _events(loser)[-1]["message"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.csv", "seg.nrrd"]
    assert sitk.ReadImage(str(out_dir / "seg.nrrd")).GetSize() == (8, 10, 12)


def test_a_killed_warm_worker_leaves_no_output(case, tmp_path, capsys):
    args, out_dir = case
    marker = tmp_path / "marker"
    proc = _launch(["serve"], "mid-write", marker)
    proc.stdin.write(json.dumps({"id": 1, "args": args[1:-2]}) + "\n")
    proc.stdin.flush()
    _wait_for(marker, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (out_dir / "seg.nrrd").exists() and not (out_dir / "seg.csv").exists()
    left = [p.name for p in out_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith(".volseg-stage-")  # a killed process cannot clean up...
    assert main(args) == 0  # ...the next run into the folder removes the dead process's staging folder
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.csv", "seg.nrrd"]


def test_sigterm_stops_the_warm_worker_with_a_json_error(case, tmp_path):
    args, out_dir = case
    marker = tmp_path / "marker"
    proc = _launch(["serve"], "stage:infer", marker)
    proc.stdin.write(json.dumps({"id": 7, "args": args[1:-2]}) + "\n")
    proc.stdin.flush()
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _assert_cancelled(proc, out_dir)


# -- disks -----------------------------------------------------------------------------------------
def _run_in_process(args: list[str], capsys) -> tuple[int, dict]:
    rc = main(args)
    events = _events(capsys.readouterr().out)
    return rc, events[-1]


@pytest.mark.parametrize("code,exit_code,words", [(errno.ENOSPC, 3, "No space left"),
                                                  (errno.EDQUOT, 3, "quota"),
                                                  (errno.EROFS, 2, "read-only"),
                                                  (errno.EACCES, 2, "permission denied")])
def test_no_inodes_quota_and_read_only_are_one_line_naming_the_output(case, capsys, monkeypatch, code, exit_code,
                                                                       words):
    import volseg.io.staging

    def refuse(*a, **k):  # the staging folder is the first thing that needs a new inode in the output folder
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(volseg.io.staging.tempfile, "mkdtemp", refuse)
    args, out_dir = case
    rc, last = _run_in_process(args, capsys)
    assert rc == exit_code and last["event"] == "error" and last["exit_code"] == exit_code
    assert words.lower() in last["message"].lower() and str(out_dir / "seg.nrrd") in last["message"]
    assert "\n" not in last["message"] and list(out_dir.iterdir()) == []


def test_full_disk_during_the_write_names_the_users_file_not_the_staging_folder(case, capsys, monkeypatch):
    import volseg.io.writers

    def full(image, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("itk::ERROR: NrrdImageIO: Write failed: No space left on device")

    monkeypatch.setattr(volseg.io.writers.sitk, "WriteImage", full)
    args, out_dir = case
    rc, last = _run_in_process(args, capsys)
    assert rc == 3 and last["exit_code"] == 3
    assert str(out_dir / "seg.nrrd") in last["message"] and ".volseg-stage" not in last["message"]
    assert list(out_dir.iterdir()) == []


def test_an_io_error_inside_the_staging_folder_is_reported_with_the_users_path(case, capsys, monkeypatch):
    import volseg.io.writers

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(volseg.io.writers, "write_color_table", broken)
    args, out_dir = case
    rc, last = _run_in_process(args, capsys)
    assert rc == 2 and "Input/output error" in last["message"]
    assert ".volseg-stage" not in last["message"] and str(out_dir) in last["message"]
    assert list(out_dir.iterdir()) == []


def test_only_staging_folders_of_dead_processes_of_this_host_are_removed(tmp_path):
    from volseg.io import staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = staging._host()
    names = {
        "dead": f"{staging.PREFIX}{host}-{int(dead.stdout)}-abc",
        "self": f"{staging.PREFIX}{host}-{os.getpid()}-abc",
        "other_host": f"{staging.PREFIX}elsewhere-{int(dead.stdout)}-abc",
        "parent": f"{staging.PREFIX}{host}-{os.getppid()}-abc",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    removed = staging.remove_stale_stages(tmp_path)
    assert [p.name for p in removed] == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
