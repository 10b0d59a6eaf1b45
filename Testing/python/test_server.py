"""``volseg server`` over real HTTP(S) on 127.0.0.1: a server in a subprocess, the real client.

The shared server runs with a self-signed certificate made here; jobs run the demo model through
the server's warm ``volseg serve`` worker. No part of the server is mocked.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='the server is the [server] extra: pip install "volseg[server]"')
pytest.importorskip("uvicorn", reason='the server is the [server] extra: pip install "volseg[server]"')

from volseg_server import MODULE_DIR, ServerProcess, engine_env, self_signed  # noqa: E402

from volseg.errors import VolSegError  # noqa: E402
from volseg.server.client import ServerClient, ServerLost  # noqa: E402
from volseg.server.jobs import JobBoard, option_args  # noqa: E402
from volseg.server.limits import Refusal, ServerLimits, header_voxels  # noqa: E402
from volseg.server.main import check_address  # noqa: E402
from volseg.server.tokens import TokenStore, add_token, new_token  # noqa: E402

#: Options that make the demo model's run take seconds (578 small windows): for cancel and kill.
SLOW = {"roi_size": [32, 32, 32], "overlap": 0.8, "sw_batch_size": 1}
SLOW_ARGS = ["--roi-size", "32", "32", "32", "--overlap", "0.8", "--sw-batch-size", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    tls = self_signed(folder)
    os.environ.setdefault("VOLSEG_RUNTIME", "torch")  # inherited by the server: no ONNX export attempts
    srv = ServerProcess(folder / "state", "--jobs-per-token", "12", "--max-upload-mb", "8", "--keep", "60", tls=tls)
    srv.cert = tls[0]
    srv.token_file = folder / "token"
    srv.token_file.write_text(srv.token + "\n")
    yield srv
    srv.stop()


def client(srv, token: str | None = None, **kw) -> ServerClient:
    return ServerClient(srv.url, srv.token if token is None else token, ca_cert=str(srv.cert), **kw)


def raw(srv, method: str, path: str, body: bytes | None = None, token: str | None = "default",
        headers: dict | None = None) -> tuple[int, dict]:
    """One request with http.client: (status, JSON answer)."""
    context = ssl.create_default_context(cafile=str(srv.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=30, context=context)
    head = dict(headers or {})
    if token is not None:
        head["Authorization"] = f"Bearer {srv.token if token == 'default' else token}"
    try:
        conn.request(method, path, body=body, headers=head)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def new_job(srv, inputs=(".nrrd",), model="demo", token="default", **spec) -> str:
    status, answer = raw(srv, "POST", "/v1/jobs", json.dumps({"model": model, "inputs": list(inputs), **spec}).encode(),
                         token=token)
    assert status == 201, answer
    return answer["id"]


def job_folder(srv, job_id: str) -> Path:
    return srv.state / "jobs" / job_id


def remote_cli(srv, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volseg", *args, "--server", srv.url, "--token-file",
                           str(srv.token_file), *(["--ca-cert", str(srv.cert)] if srv.url.startswith("https") else [])],
                          capture_output=True, text=True, timeout=timeout, env=env or engine_env())


def events_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------- who may use it
def test_no_wrong_or_revoked_token_is_401_and_nothing_runs(server, ct_path) -> None:
    assert raw(server, "GET", "/v1/health", token=None) == (200, {"status": "ok", "version": pytest.approx(
        raw(server, "GET", "/v1/health", token=None)[1]["version"])})
    for token in (None, "x" * 43, server.token[:-1] + ("A" if server.token[-1] != "A" else "B")):
        for method, path in (("GET", "/v1/info"), ("GET", "/v1/models"), ("POST", "/v1/jobs")):
            status, answer = raw(server, method, path, b"{}" if method == "POST" else None, token=token)
            assert status == 401 and "token" in answer["error"]["message"], answer
    added = subprocess.run([sys.executable, "-m", "volseg", "server", "--state-dir", str(server.state), "--add-token",
                            "alice"], capture_output=True, text=True, env=engine_env(), timeout=60)
    assert added.returncode == 0, added.stderr
    alice = added.stdout.split()[-1]
    assert raw(server, "GET", "/v1/info", token=alice)[1]["token"] == "alice"  # no restart needed
    job = new_job(server, token=alice)
    assert raw(server, "GET", f"/v1/jobs/{job}", token="default")[0] == 404  # a job is its token's alone
    tokens = server.state / "tokens"
    kept = [line for line in tokens.read_text().splitlines() if not line.startswith("alice ")]
    fd = os.open(tokens, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, ("\n".join(kept) + "\n").encode())
    os.close(fd)
    status, answer = raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", ct_path.read_bytes(), token=alice)
    assert status == 401 and "revoked" in answer["error"]["message"]
    assert list(job_folder(server, job).iterdir()) == []  # the revoked token's upload was not stored
    assert raw(server, "GET", "/v1/info")[0] == 200  # the others keep working


def test_token_store_rereads_the_file_and_refuses_a_readable_one(tmp_path) -> None:
    path = tmp_path / "tokens"
    first = add_token(path, "a")
    store = TokenStore(path)
    assert store.who(first) == "a" and store.who(new_token()) is None and store.who("") is None
    second = add_token(path, "b")
    assert store.who(second) == "b"
    os.chmod(path, 0o644)  # other users could read it: nobody is let in
    assert store.who(first) is None
    with pytest.raises(VolSegError, match="already"):
        os.chmod(path, 0o600)
        add_token(path, "a")


# ---------------------------------------------------------------------------------- limits and refusals
def _send_head_only(srv, path: str, head: bytes, length: int) -> tuple[int, dict]:
    """Send ``head`` and claim ``length`` bytes, never sending the rest: the answer must come anyway."""
    context = ssl.create_default_context(cafile=str(srv.cert))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=20, context=context)
    try:
        conn.putrequest("PUT", path)
        conn.putheader("Authorization", f"Bearer {srv.token}")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        if head:
            conn.send(head)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_oversized_uploads_are_413_before_the_body_is_stored(server, tmp_path) -> None:
    job = new_job(server)
    status, answer = _send_head_only(server, f"/v1/jobs/{job}/inputs/0", b"", 9 * 1024 * 1024)
    assert status == 413 and "larger than this server accepts" in answer["error"]["message"]
    header = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1000 1000 1000\nencoding: raw\n\n"
    status, answer = _send_head_only(server, f"/v1/jobs/{job}/inputs/0", header, 4 * 1024 * 1024)
    assert status == 413 and "1,000,000,000 voxels" in answer["error"]["message"], answer
    import nibabel as nib

    nii = nib.Nifti1Header()
    nii.set_data_shape((1000, 1000, 1000))
    gz_job = new_job(server, inputs=(".nii.gz",))
    status, answer = _send_head_only(server, f"/v1/jobs/{gz_job}/inputs/0",
                                     gzip.compress(nii.binaryblock + b"\0\0\0\0"), 4 * 1024 * 1024)
    assert status == 413 and "voxels" in answer["error"]["message"]
    big = tmp_path / "claims-1e9.nrrd"  # through the client: the refusal's message, not a broken pipe
    big.write_bytes(header + bytes(6 << 20))
    with pytest.raises(VolSegError, match="1,000,000,000 voxels") as refused:
        client(server).upload(job, 0, big)
    assert refused.value.exit_code == 2
    assert list(job_folder(server, job).iterdir()) == [] and list(job_folder(server, gz_job).iterdir()) == []
    for j in (job, gz_job):
        assert raw(server, "DELETE", f"/v1/jobs/{j}")[0] == 200


def test_malformed_bodies_unknown_models_and_non_volumes_are_400(server) -> None:
    cases = [b"{not json", b"[1, 2]", json.dumps({"model": "no-such-card", "inputs": [".nrrd"]}).encode(),
             json.dumps({"model": "demo", "inputs": [".png"]}).encode(),
             json.dumps({"model": "demo", "inputs": [".nrrd"], "options": {"overlap": "lots"}}).encode(),
             json.dumps({"model": "demo", "inputs": [".nrrd"], "options": {"roi_size": [True, 2, 3]}}).encode(),
             json.dumps({"model": "demo", "inputs": [".nrrd"], "options": {"rm": "-rf"}}).encode(),
             json.dumps({"model": "demo", "inputs": [".nrrd"], "result": ".exe"}).encode()]
    for body in cases:
        status, answer = raw(server, "POST", "/v1/jobs", body)
        assert status == 400 and answer["error"]["message"], (body, answer)
    assert "no model 'no-such-card'" in raw(server, "POST", "/v1/jobs", cases[2])[1]["error"]["message"]
    job = new_job(server)
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    status, answer = raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", png)
    assert status == 400 and "not a NRRD file" in answer["error"]["message"]
    assert raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", b"")[0] == 400
    assert raw(server, "PUT", f"/v1/jobs/{job}/inputs/7", b"NRRD")[0] == 400
    assert list(job_folder(server, job).iterdir()) == []
    assert raw(server, "POST", f"/v1/jobs/{job}/cancel")[1]["state"] == "cancelled"  # before its upload
    assert not job_folder(server, job).exists()
    status, answer = raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", b"NRRD0004\n")
    assert status == 409 and answer["error"]["message"]
    assert raw(server, "DELETE", f"/v1/jobs/{job}")[0] == 200
    assert raw(server, "GET", f"/v1/jobs/{job}")[0] == 404


def test_path_tricks_never_touch_a_file_outside_the_job_folder(server, tmp_path) -> None:
    before = sorted(p.name for p in server.state.iterdir())
    assert before == ["jobs", "tokens", "worker-auto.log"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in [server.state, *server.state.iterdir()])  # private
    for model in ("../../etc/passwd", "/etc/passwd", str(MODULE_DIR.parent / "Resources/ModelCards/demo.json")):
        status, answer = raw(server, "POST", "/v1/jobs", json.dumps({"model": model, "inputs": [".nrrd"]}).encode())
        assert status == 400 and "no model" in answer["error"]["message"]
    for spec in ({"inputs": ["../../x.nrrd"]}, {"inputs": ["/tmp/x.nrrd"]}, {"inputs": [".nrrd"], "result": "/tmp/x.seg.nrrd"},
                 {"inputs": [".nrrd"], "result": "../.seg.nrrd"}):
        status, _ = raw(server, "POST", "/v1/jobs", json.dumps({"model": "demo", **spec}).encode())
        assert status == 400
    for path in ("/v1/jobs/..%2Ftokens", "/v1/jobs/..%2F..%2Fetc%2Fpasswd/files", "/v1/jobs/%2Fetc%2Fpasswd"):
        assert raw(server, "GET", path)[0] == 404
    job = new_job(server)
    assert raw(server, "GET", f"/v1/jobs/{job}/files/..%2F..%2Ftokens")[0] in (404, 409)
    assert raw(server, "PUT", f"/v1/jobs/{job}/inputs/..%2F..%2Ftokens", b"NRRD0004\n")[0] in (400, 404)
    detached = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/passwd\n\n"
    status, answer = raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", detached)
    assert status == 400 and "another data file" in answer["error"]["message"]
    mha_job = new_job(server, inputs=(".mha",))
    mha = b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n"
    assert raw(server, "PUT", f"/v1/jobs/{mha_job}/inputs/0", mha)[0] == 400
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        link = tarfile.TarInfo("input0.nrrd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert raw(server, "PUT", f"/v1/jobs/{job}/inputs/0", archive.getvalue())[0] == 400
    for j in (job, mha_job):
        assert list(job_folder(server, j).iterdir()) == []
        raw(server, "DELETE", f"/v1/jobs/{j}")
    assert sorted(p.name for p in server.state.iterdir()) == before
    assert not any(p.is_symlink() for p in server.state.rglob("*"))


def test_bounded_queue_is_503_and_jobs_per_token_429(tmp_path) -> None:
    board = JobBoard(tmp_path / "state", ServerLimits(queue_length=2, jobs_per_token=3), [], [], "box")
    jobs = [board.create("a", "demo", [".nrrd"], ".nrrd", []) for _ in range(3)]
    with pytest.raises(Refusal) as refused:
        board.create("a", "demo", [".nrrd"], ".nrrd", [])
    assert refused.value.status == 429
    board.create("b", "demo", [".nrrd"], ".nrrd", [])  # another token is not held back
    board.enqueue(jobs[0])
    board.enqueue(jobs[1])
    with pytest.raises(Refusal) as full:
        board.enqueue(jobs[2])
    assert full.value.status == 503 and full.value.body()["error"]["queue_length"] == 2
    board.cancel(jobs[0])
    assert jobs[0].state == "cancelled" and not jobs[0].folder.exists() and board.position(jobs[1]) == 0


def test_header_checks_option_checks_and_the_address_rule(tmp_path) -> None:
    import nibabel as nib

    limits = ServerLimits(max_voxels=1000)
    nii = nib.Nifti1Header()
    nii.set_data_shape((10, 10, 10))
    assert header_voxels(nii.binaryblock + b"\0" * 4, ".nii", False, limits) == 1000
    assert header_voxels(gzip.compress(nii.binaryblock), ".nii.gz", False, limits) == 1000
    assert header_voxels(b"NRRD0005\nsizes: 10 10 10\n", ".nrrd", False, limits) is None  # header not complete yet
    assert header_voxels(b"NRRD0005\nsizes: 10 10 10\n\n", ".nrrd", False, limits) == 1000
    mha = b"NDims = 3\nDimSize = 5 5 5\nElementNumberOfChannels = 9\nElementDataFile = LOCAL\n"
    with pytest.raises(Refusal) as refused:
        header_voxels(mha, ".mha", False, limits)
    assert refused.value.status == 413
    assert option_args({"overlap": 0.5, "flips": False, "roi_size": [32, 32, 16]}) == [
        "--overlap", "0.5", "--no-flips", "--roi-size", "32", "32", "16"]
    for bad in ({"sw_batch_size": 1.5}, {"flips": 1}, {"roi_size": [1, 2]}, {"roi_size": ["--", 1, 1]}, ["x"]):
        with pytest.raises(Refusal):
            option_args(bad)
    assert check_address("127.0.0.1", False, False) is None and check_address("0.0.0.0", True, False) is None
    with pytest.raises(VolSegError, match="--insecure-http"):
        check_address("0.0.0.0", False, False)
    assert "warning" in check_address("192.0.2.1", False, True)
    refused_start = subprocess.run([sys.executable, "-m", "volseg", "server", "--host", "0.0.0.0", "--port", "0",
                                    "--state-dir", str(tmp_path / "s")], capture_output=True, text=True,
                                   env=engine_env(), timeout=60)
    assert refused_start.returncode == 2 and "without TLS" in refused_start.stderr and "Traceback" not in refused_start.stderr


# ---------------------------------------------------------------------------------- the remote run
def test_remote_demo_is_byte_identical_to_a_local_run(server, ct_path, tmp_path) -> None:
    from volseg.cli.main import main

    earlier_jobs = set((server.state / "jobs").iterdir())
    assert main(["segment", str(ct_path), "--model", "demo", "-o", str(tmp_path / "local.nrrd"), "--device", "cpu",
                 "--progress", "none"]) == 0
    for name in ("remote.nrrd", "remote.seg.nrrd"):
        done = remote_cli(server, "segment", str(ct_path), "--model", "demo", "-o", str(tmp_path / name),
                          "--progress", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        events = events_of(done.stdout)
        assert events[-1]["event"] == "done" and events[-1]["outputs"]["segmentation"] == str(tmp_path / name)
        assert events[-1]["device"].startswith("test-box: ") and events[-1]["labels_present"]
        assert {"upload", "queue", "read", "infer", "write", "download"} <= {e.get("stage") for e in events}
        assert any(e["event"] == "progress" for e in events)
        assert str(server.state) not in done.stdout  # the server's folders never reach the client
    assert (tmp_path / "remote.nrrd").read_bytes() == (tmp_path / "local.nrrd").read_bytes()
    assert (tmp_path / "remote.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    import slicerio

    segments = slicerio.read_segmentation(str(tmp_path / "remote.seg.nrrd"), skip_voxels=True)["segments"]
    assert {s["name"] for s in segments} <= {lab["name"] for lab in json.loads(
        (MODULE_DIR.parent / "Resources/ModelCards/demo.json").read_text())["labels"]} and segments
    assert set((server.state / "jobs").iterdir()) <= earlier_jobs  # fetched jobs are removed at once


def test_the_client_verifies_tls_and_lists_the_servers_models(server, tmp_path) -> None:
    plain = subprocess.run([sys.executable, "-m", "volseg", "models", "--json", "--server", server.url,
                            "--token-file", str(server.token_file)], capture_output=True, text=True, env=engine_env(),
                           timeout=60)
    assert plain.returncode == 2 and "certificate" in plain.stderr and "--ca-cert" in plain.stderr
    listed = remote_cli(server, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["id"]: m for m in json.loads(listed.stdout)["models"]}
    assert models["demo"]["checkpoint"]["present"] is True and models["demo"]["card_path"] is None
    assert str(MODULE_DIR) not in listed.stdout  # no server path in the listing


def test_the_token_file_is_private_and_holds_256_bit_tokens(server) -> None:
    tokens = server.state / "tokens"
    assert (tokens.stat().st_mode & 0o777) == 0o600
    assert len(server.token) >= 43  # 32 random bytes, URL-safe base64


# ---------------------------------------------------------------------------------- many clients, cancel
def test_ten_clients_at_once_all_finish_one_at_a_time_in_queue_order(server, ct_path, tmp_path) -> None:
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            c = client(server)
            job = c.create_job("demo", [".nrrd"], ".nrrd", {})["id"]
            c.upload(job, 0, ct_path)
            since, state = 0, "queued"
            for _ in range(600):  # bounded: each answer waits at most 1 s
                answer = c.events(job, since, wait=1.0)
                since, state = answer["next"], answer["state"]
                if state in ("done", "error", "cancelled"):
                    break
            target = tmp_path / f"client{n}.nrrd"
            c.download(job, "result.nrrd", target)
            results[n] = {**c.request("GET", f"/v1/jobs/{job}"), "bytes": target.read_bytes(), "job": job}
            c.delete(job)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert sorted(results) == list(range(10)) and all(r["state"] == "done" for r in results.values())
    assert len({r["bytes"] for r in results.values()}) == 1  # the same result for everyone
    runs = sorted(results.values(), key=lambda r: r["queued"])
    assert [r["started"] for r in runs] == sorted(r["started"] for r in runs)  # queue order kept
    for earlier, later in zip(runs, runs[1:]):
        assert later["started"] >= earlier["ended"] - 0.05  # one at a time on the device
    assert not any(job_folder(server, r["job"]).exists() for r in runs)  # deleted after the fetch


def test_cancel_mid_run_stops_the_job_and_removes_its_files(server, ct_path) -> None:
    c = client(server)
    job = c.create_job("demo", [".nrrd"], ".nrrd", SLOW)["id"]
    c.upload(job, 0, ct_path)
    since, seen = 0, []
    for _ in range(120):
        answer = c.events(job, since, wait=1.0)
        since, seen = answer["next"], seen + answer["events"]
        if any(e["event"] == "progress" for e in seen):
            break
    assert any(e["event"] == "progress" for e in seen), seen
    asked = time.monotonic()
    c.cancel(job)
    for _ in range(40):
        state = c.request("GET", f"/v1/jobs/{job}")["state"]
        if state == "cancelled":
            break
        time.sleep(0.25)
    assert state == "cancelled" and time.monotonic() - asked < 10
    last = c.events(job, 0, wait=0)["events"][-1]
    assert last["event"] == "error" and last["exit_code"] == 130
    assert not job_folder(server, job).exists()
    c.delete(job)


def test_server_killed_mid_job_the_client_reports_the_loss_and_a_restart_enforces_job_time(ct_path, tmp_path) -> None:
    import psutil

    state = tmp_path / "state"
    srv = ServerProcess(state)
    out = tmp_path / "out" / "seg.nrrd"
    out.parent.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(srv.token)
    env = engine_env(VOLSEG_SERVER_RETRY_S="30", VOLSEG_RUNTIME="torch")
    proc = subprocess.Popen([sys.executable, "-m", "volseg", "segment", str(ct_path), "--model", "demo", "-o", str(out),
                             "--server", srv.url, "--token-file", str(token_file), "--progress", "json", *SLOW_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.monotonic() + 120
        for line in proc.stdout:  # bounded by the time check and the job's own end
            if '"progress"' in line or time.monotonic() > end:
                break
        workers = psutil.Process(srv.proc.pid).children(recursive=True)
        assert workers, "the server had no engine worker running the job"
        srv.stop(signal.SIGKILL)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive  # the engine died with the server: nothing keeps running the lost job
        restarted = ServerProcess(state, "--job-time", "3", port=srv.port)
        try:
            assert list((state / "jobs").iterdir()) == []  # the lost job's files went at the restart
            rest, err = proc.communicate(timeout=90)
            # the restarted server stops a job that runs longer than --job-time
            c = ServerClient(restarted.url, restarted.token)
            job = c.create_job("demo", [".nrrd"], ".nrrd", SLOW)["id"]
            c.upload(job, 0, ct_path)
            since, events = 0, []
            for _ in range(120):
                answer = c.events(job, since, wait=1.0)
                since, events = answer["next"], events + answer["events"]
                if answer["state"] in ("done", "error", "cancelled"):
                    break
            assert answer["state"] == "error" and events[-1]["exit_code"] == 3
            assert "longer than this server allows (3 s)" in events[-1]["message"]
            assert not job_folder(restarted, job).exists()
        finally:
            restarted.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    final = events_of(rest)[-1]
    assert final["event"] == "error" and "no longer knows this job" in final["message"]
    assert list(out.parent.iterdir()) == []  # no half result, no staging file


def test_a_server_gone_for_good_is_reported_within_the_retry_window(tmp_path) -> None:
    lost = ServerClient("http://127.0.0.1:9", "t" * 43, lost_after_s=1.0)
    started = time.monotonic()
    with pytest.raises(ServerLost, match="lost the connection"):
        lost.info()
    assert time.monotonic() - started < 10
