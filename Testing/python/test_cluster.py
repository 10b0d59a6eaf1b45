"""`volseg batch --cluster`: cases on a local Ray instance (2 CPUs, no dashboard, loopback only).

One Ray instance serves the whole module. Ray is an optional extra: where it is not installed
these tests are skipped, visibly -- except under CI (``CI`` or ``VOLSEG_REQUIRE_RAY`` set, as
``.ci/run`` does), where a missing Ray is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import make_card
from test_batch import SCALE, write_case

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI") or os.environ.get("VOLSEG_REQUIRE_RAY"):
        raise RuntimeError("Ray is not installed but CI needs the cluster tests: pip install -e '.[test,cluster]'")
    pytest.skip("Ray is not installed (pip install -e '.[cluster]'); the --cluster tests need it",
                allow_module_level=True)

from volseg.cohort import cluster
from volseg.cli.main import main
from volseg.cohort.manifest import MANIFEST_NAME, read_rows

TESTS_DIR = Path(__file__).resolve().parent
SHAPES = [(20, 16, 12), (16, 16, 16), (24, 16, 12), (20, 20, 12), (16, 24, 12), (20, 16, 16)]


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_local(faults):
    """The module's Ray instance, started the way ``--cluster local`` starts one, plus the
    fault-injection hook (cluster_faults.py) in every worker. (Ray is imported by start_local:
    imported before, it would not be told to keep to the loopback interface.)"""
    cluster.start_local(num_cpus=2, runtime_env={
        "env_vars": {"VOLSEG_TEST_FAULTS": str(faults),
                     "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), cluster.ENGINE_ROOT])},
        "worker_process_setup_hook": "cluster_faults.install"})
    import ray

    yield ray
    cluster.stop_local()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six small cases, a card and the plain (single-process) batch's results for them."""
    folder = tmp_path_factory.mktemp("cohort")
    cases = folder / "cases"
    cases.mkdir()
    for n, shape in enumerate(SHAPES):
        write_case(cases / f"c{n}.nii.gz", value=200.0 + 150 * n, shape=shape)
    card = make_card(folder, "thr", preprocessing=SCALE)
    return {"cases": cases, "card": card, "folder": folder}


def batch(cohort, checkpoint, out, *extra, progress="json"):
    return main(["batch", str(cohort["cases"]), "--model", str(cohort["card"]), "--checkpoint", str(checkpoint),
                 "-o", str(out), "--progress", progress, *extra])


def events(capsys):
    """The JSON events on stdout. Ray's own messages go to stderr while volseg drives it; one that
    Ray's listener thread prints after the run (the Ray instance outlives the run here, not in
    the CLI) may reach stdout, and is left out."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if "(raylet)" not in line]


def results(out: Path) -> dict[str, bytes]:
    """The bytes of each result, less the one line pynrrd stamps with the time of writing."""
    return {p.name: b"".join(line for line in p.read_bytes().splitlines(keepends=True)
                             if not line.startswith(b"# on "))
            for p in sorted(out.iterdir()) if p.name.endswith(".seg.nrrd")}


@pytest.fixture(scope="module")
def plain_results(cohort, threshold_torchscript):
    out = cohort["folder"] / "plain"
    assert batch(cohort, threshold_torchscript, out, progress="none") == 0
    return results(out)


def test_two_actors_give_the_plain_batch_results_and_a_killed_worker_is_retried(
        ray_local, cohort, threshold_torchscript, plain_results, faults, capsys, tmp_path):
    import volseg

    out = tmp_path / "ray"
    (faults / "kill-c2.seg.nrrd").write_text("")
    assert batch(cohort, threshold_torchscript, out, "--cluster", "local", "--workers", "2") == 0
    ev = events(capsys)
    assert not (faults / "kill-c2.seg.nrrd").exists() and (faults / "kill-c2.seg.nrrd.done").exists()
    assert results(out) == plain_results  # byte-identical label maps
    assert len(plain_results) == 6
    rows, bad = read_rows(out / MANIFEST_NAME)
    assert bad == 0 and sorted(rows) == [f"c{n}" for n in range(6)]
    assert {r["status"] for r in rows.values()} == {"done"}
    assert rows["c2"]["attempts"] == 2 and all(rows[c]["attempts"] == 1 for c in rows if c != "c2")
    assert all(r["device"] == "cpu" and r["overhead_s"] >= 0 and r["timings"]["infer"] > 0 for r in rows.values())
    retries = [e for e in ev if e["event"] == "case" and e["status"] == "retry"]
    assert [e["case"] for e in retries] == ["c2"] and "its worker died" in retries[0]["message"]
    done = [e for e in ev if e["event"] == "case" and e["status"] == "done"]
    assert len(done) == 6 and done[-1]["cohort"]["done"] == 6 and done[-1]["cohort"]["cases_per_min"] > 0
    assert not list(out.glob(".volseg-stage-*")) and not list(out.glob(".*tmp*"))  # nothing partial left
    logs = [e["message"] for e in ev if e["event"] == "log"]
    assert any("2 worker(s), each with 1 CPU(s) (cpu, 1 thread(s))" in m for m in logs)
    ready = [m for m in logs if m.startswith("worker pid")]
    assert len(ready) >= 2  # (the one started in place of the killed one may not be ready before the end)
    assert all(m.endswith(f"from {Path(volseg.__file__).parent})") for m in ready)  # this checkout's engine

    # a re-run skips everything (and needs no worker); a changed option re-runs everything
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert batch(cohort, threshold_torchscript, out, "--cluster", "local", "--workers", "2") == 0
    ev = events(capsys)
    assert [e["status"] for e in ev if e["event"] == "case"] == ["skipped"] * 6
    assert not any(e["event"] == "log" and "worker(s)" in e["message"] for e in ev)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != MANIFEST_NAME} == \
        {k: v for k, v in before.items() if k != MANIFEST_NAME}
    assert batch(cohort, threshold_torchscript, out, "--cluster", "local", "--workers", "1", "--overlap", "0.5") == 0
    ev = events(capsys)
    assert sorted(e["case"] for e in ev if e["event"] == "case" and e["status"] == "done") == [f"c{n}" for n in range(6)]
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert {r["made_with"]["options"]["overlap"] for r in rows.values()} == {0.5}


def test_an_invisible_input_and_a_case_that_keeps_killing_its_worker_fail_alone(
        ray_local, cohort, threshold_torchscript, faults, monkeypatch, capsys, tmp_path):
    import volseg.cohort.batch
    from volseg.cohort.batch import Case

    real = volseg.cohort.batch.find_cases
    ghost = tmp_path / "elsewhere" / "ghost.nii.gz"  # a path the workers do not see
    monkeypatch.setattr(volseg.cohort.batch, "find_cases", lambda paths, card: [*real(paths, card)[:2], Case("ghost", [ghost])])
    for n in (1, 2):  # c1 kills its worker twice: with --retries 1 that is all its tries
        (faults / f"kill-c1.seg.nrrd.{n}").write_text("")
    out = tmp_path / "o"
    assert batch(cohort, threshold_torchscript, out, "--cluster", "local", "--workers", "1", "--retries", "1") == 1
    ev = events(capsys)
    assert not list(faults.glob("kill-c1.seg.nrrd.[12]"))
    errors = {e["message"].split(":")[0]: e for e in ev if e["event"] == "error"}
    assert set(errors) == {"ghost", "c1"}
    assert errors["ghost"]["message"] == f"ghost: input {ghost} is not visible on {cluster.node_name()}"
    assert "file system every node mounts" in errors["ghost"]["hint"]
    assert errors["c1"]["message"].startswith("c1: its worker died 2 time(s) while segmenting it")
    retries = [e for e in ev if e["event"] == "case" and e["status"] == "retry"]
    assert [e["case"] for e in retries] == ["c1"] and retries[0]["message"].startswith("its worker died (")
    assert retries[0]["message"].endswith("trying again (2 of 2)")
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert {c: (r["status"], r["attempts"]) for c, r in rows.items()} == \
        {"c0": ("done", 1), "c1": ("failed", 2), "ghost": ("failed", 1)}
    assert sorted(p.name for p in out.iterdir()) == ["c0.seg.nrrd", MANIFEST_NAME]  # nothing partial of c1


def test_cancel_keeps_finished_cases_and_records_the_rest(ray_local, cohort, threshold_torchscript, tmp_path):
    from volseg.cohort.batch import run_batch
    from volseg.cli.parser import build_parser
    from volseg.cli.segment import request_from_args
    from volseg.errors import Cancelled
    from volseg.progress import JsonReporter

    cancel = threading.Event()

    class CancelAfterFirstCase(JsonReporter):
        def emit(self, event):
            if event["event"] == "case" and event["status"] == "done":
                cancel.set()

    out = tmp_path / "o"
    args = build_parser().parse_args(["batch", str(cohort["cases"]), "--model", str(cohort["card"]),
                                      "--checkpoint", str(threshold_torchscript), "-o", str(out)])
    settings = cluster.ClusterSettings("local", workers=1)
    with pytest.raises(Cancelled, match=r"cancelled: 1 case\(s\) done, 0 failed, 5 not done"):
        run_batch(request_from_args(args), [cohort["cases"]], out, ".seg.nrrd", CancelAfterFirstCase(), cancel, settings)
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert sorted(r["status"] for r in rows.values()) == ["done"] + ["not_done"] * 5
    done = [c for c, r in rows.items() if r["status"] == "done"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{done[0]}.seg.nrrd", MANIFEST_NAME])


def test_local_instance_keeps_to_the_loopback_interface(ray_local):
    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.1"}


def test_the_command_line_starts_and_stops_its_own_loopback_instance(cohort, threshold_torchscript, tmp_path):
    """`volseg batch --cluster local` as a user runs it: a process of its own, which starts Ray
    (on the loopback interface: nothing may import Ray before that) and stops it again."""
    import subprocess
    import sys

    out = tmp_path / "o"
    # Issue 18: another user's address in the shared Ray folder and in RAY_ADDRESS changes nothing:
    # `local` starts its own instance (today's Ray joins theirs, or fails: "num_cpus must not be provided").
    listener = _Listener()
    _plant_cluster_file(tmp_path / "shared", f"127.0.0.1:{listener.port}", foreign=True)
    runtime = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths must stay < 108 characters
    env = _engine_env(RAY_TMPDIR=str(tmp_path / "shared"), RAY_ADDRESS=f"127.0.0.1:{listener.port}",
                      XDG_RUNTIME_DIR=str(runtime))
    script = ("import sys; from volseg.cli.main import main; rc = main(sys.argv[1:]); "
              "import ray; print('NODE', ray.util.get_node_ip_address() if ray.is_initialized() else 'stopped'); "
              "sys.exit(rc)")
    one_case = cohort["cases"] / "c0.nii.gz"
    try:
        proc = subprocess.run([sys.executable, "-c", script, "batch", str(one_case), "--model", str(cohort["card"]),
                               "--checkpoint", str(threshold_torchscript), "-o", str(out), "--cluster", "local",
                               "--progress", "json"], capture_output=True, text=True, env=env, timeout=300, check=False)
    finally:
        listener.close()
        leftovers = list(runtime.iterdir())
        shutil.rmtree(runtime, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert listener.received == []
    assert leftovers == []  # the private folder (under the user's runtime folder) was removed
    assert "Ray was imported before" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "NODE stopped"
    events = [json.loads(line) for line in lines[:-1]]  # stdout: JSON events only
    assert [e["status"] for e in events if e["event"] == "case"] == ["done"]
    assert any(e["event"] == "log" and e["message"].startswith("cluster local: 1 node(s) (127.0.0.1);") for e in events)
    assert (out / "c0.seg.nrrd").exists()


def test_auto_joins_the_running_cluster_and_leaves_it_running(ray_local, cohort, threshold_torchscript, tmp_path):
    """`--cluster auto` from another process joins this module's instance (named by RAY_ADDRESS,
    as `ray start` leaves it for the processes of a node), runs there and only disconnects."""
    import subprocess
    import sys

    out = tmp_path / "o"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([cluster.ENGINE_ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "volseg", "batch", str(cohort["cases"] / "c3.nii.gz"),
                           "--model", str(cohort["card"]), "--checkpoint", str(threshold_torchscript), "-o", str(out),
                           "--cluster", "auto", "--progress", "json"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert any(e["event"] == "log" and e["message"].startswith("cluster auto: 1 node(s) (127.0.0.1);") for e in events)
    assert [e["status"] for e in events if e["event"] == "case"] == ["done"]
    assert ray_local.is_initialized() and all(n["Alive"] for n in ray_local.nodes())


# -- issue 18 (1): no cluster is discovered through a path other local users can write ---------
class _Listener:
    """A TCP server on the loopback interface that records every connection made to it (the
    attacker's end: a victim that connects there would send its Ray token)."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import socket

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            conn.settimeout(1.0)
            try:
                self.received.append(conn.recv(65536) or b"(connected)")
            except OSError:
                self.received.append(b"(connected)")
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def _plant_cluster_file(root: Path, address: str, foreign: bool) -> Path:
    """``root/ray/ray_current_cluster`` as another local user would leave it in ``/tmp/ray``
    (folder 0777 without the sticky bit): owned by someone else (as root) or world-writable."""
    folder = root / "ray"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    path = folder / "ray_current_cluster"
    path.write_text(address)
    os.chmod(path, 0o666)
    if foreign and os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    return path


def _engine_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "VOLSEG_RAY_INSTANCE")}
    env["PYTHONPATH"] = os.pathsep.join([cluster.ENGINE_ROOT, os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.mark.parametrize("foreign", [True, False], ids=["another-users-file", "world-writable-file"])
def test_auto_refuses_a_cluster_file_another_user_could_have_written(cohort, threshold_torchscript, tmp_path, foreign):
    """The attack: another user writes their own address into Ray's shared address file and
    listens; `--cluster auto` must refuse (naming the file) and connect to nothing."""
    import subprocess
    import sys

    listener = _Listener()
    try:
        planted = _plant_cluster_file(tmp_path / "shared", f"127.0.0.1:{listener.port}", foreign)
        proc = subprocess.run([sys.executable, "-m", "volseg", "batch", str(cohort["cases"] / "c0.nii.gz"),
                               "--model", str(cohort["card"]), "--checkpoint", str(threshold_torchscript),
                               "-o", str(tmp_path / "o"), "--cluster", "auto", "--progress", "json"],
                              capture_output=True, text=True, env=_engine_env(RAY_TMPDIR=str(tmp_path / "shared")),
                              timeout=120, check=False)
    finally:
        listener.close()
    assert listener.received == []  # nothing (no token) was sent to the planted address
    assert proc.returncode == 3, proc.stderr
    errors = [json.loads(line) for line in proc.stdout.splitlines() if '"error"' in line]
    assert errors and f"RAY_ADDRESS is not set and Ray's cluster address file {planted}" in errors[-1]["message"]
    assert "RAY_ADDRESS" in errors[-1]["hint"]
    assert "Traceback" not in proc.stderr


def test_auto_address_comes_only_from_ray_address_or_a_private_file_of_the_user(tmp_path, monkeypatch):
    from volseg.errors import ResourceError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    path = cluster.ray_address_file()
    assert path == tmp_path / "ray" / "ray_current_cluster"
    with pytest.raises(ResourceError, match="does not exist: no cluster to join"):
        cluster.auto_address()
    path.parent.mkdir()
    path.write_text("10.1.2.3:6379\n")
    os.chmod(path, 0o644)  # as `ray start` leaves it: the user's own, only they can write it
    assert cluster.auto_address() == "10.1.2.3:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:7000")
    assert cluster.auto_address() == "10.9.9.9:7000"  # the environment wins
    monkeypatch.delenv("RAY_ADDRESS")
    os.chmod(path, 0o620)
    with pytest.raises(ResourceError, match="can be changed by other users"):
        cluster.auto_address()
    os.chmod(path, 0o600)
    path.write_text("not an address; rm -rf ~")
    with pytest.raises(ResourceError, match="does not hold a HOST:PORT address"):
        cluster.auto_address()
    path.unlink()
    target = tmp_path / "mine"
    target.write_text("10.1.2.3:6379")
    path.symlink_to(target)
    with pytest.raises(ResourceError, match="is a symbolic link"):
        cluster.auto_address()
    path.unlink()
    os.mkfifo(path)  # refused at once, not read for ever
    with pytest.raises(ResourceError, match=r"is a FIFO \(named pipe\)"):
        cluster.auto_address()


def test_local_instance_lives_in_a_private_folder_with_a_private_token(ray_local):
    folder = cluster._local["folder"]
    assert os.stat(folder).st_mode & 0o777 == 0o700
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.parent == folder and os.stat(token).st_mode & 0o777 == 0o600
    assert os.environ["RAY_AUTH_MODE"] == "token"
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert folder in session.parents  # not under /tmp/ray
    assert not str(session).startswith(os.path.join(os.sep, "tmp", "ray") + os.sep)


# -- issue 18 (10): a local instance ends with its driver, however the driver ends -------------
def _descendants_alive(procs) -> list:
    import psutil

    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_cancels_a_cluster_batch_like_ctrl_c(cohort, threshold_torchscript, tmp_path):
    """Ray's SIGTERM handler made the driver exit 1 with no final event; the plain batch gives 130."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "o"
    runtime = Path(tempfile.mkdtemp(prefix="rt-"))
    proc = subprocess.Popen([sys.executable, "-m", "volseg", "batch", str(cohort["cases"]), "--model",
                             str(cohort["card"]), "--checkpoint", str(threshold_torchscript), "-o", str(out),
                             "--cluster", "local", "--workers", "1", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_engine_env(XDG_RUNTIME_DIR=str(runtime)))
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if '"cluster local:' in line:
                break
        assert any('"cluster local:' in line for line in lines), "".join(lines) + proc.stderr.read()
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    final = json.loads((lines + rest.splitlines(keepends=True))[-1])
    assert final["event"] == "error" and final["exit_code"] == 130 and "cancelled" in final["message"]
    deadline = time.monotonic() + 60
    while _descendants_alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _descendants_alive(family) == []
    assert list(runtime.iterdir()) == []
    shutil.rmtree(runtime, ignore_errors=True)


def test_a_killed_driver_leaves_no_ray_process_and_no_folder_behind(tmp_path):
    """SIGKILL cannot be handled: the watchdog started with the instance ends its processes."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    runtime = Path(tempfile.mkdtemp(prefix="rt-"))
    script = ("from volseg.cohort import cluster; cluster.start_local(num_cpus=1); import time, ray; "
              "ray.get(ray.remote(lambda: 1).remote()); print('READY', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_engine_env(XDG_RUNTIME_DIR=str(runtime)))
    try:
        assert proc.stdout.readline().strip() == "READY"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 3  # the watchdog, Ray's servers and agents, a worker
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (_descendants_alive(family) or list(runtime.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _descendants_alive(family) == []
        assert list(runtime.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.Process().children(recursive=True):  # nothing of this test may outlive it
            if p.pid != proc.pid and "VOLSEG_RAY_INSTANCE" in (p.environ() if p.is_running() else {}):
                p.kill()
        shutil.rmtree(runtime, ignore_errors=True)


def test_rays_token_file_is_made_private_before_joining_a_cluster(tmp_path, monkeypatch):
    """Ray writes ~/.ray/auth_token mode 0644: any local user could read the cluster's token."""
    token = tmp_path / "auth_token"
    token.write_text("0" * 64)
    os.chmod(token, 0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    cluster._private_token_file()
    assert os.stat(token).st_mode & 0o777 == 0o600
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    default = tmp_path / ".ray" / "auth_token"
    default.write_text("1" * 64)
    os.chmod(default, 0o644)
    cluster._private_token_file()
    assert os.stat(default).st_mode & 0o777 == 0o600
