"""The Slicer half with Run on = server: the same user chain as test_slicer_chain.py, on
slicer-core, with every run sent to a real ``volseg server`` (HTTPS on 127.0.0.1) through the
``volseg segment --server`` background process the runner starts."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest

from volseg_server import MODULE_DIR, ServerProcess, self_signed

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the [test] extra: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason='the server is the [server] extra: pip install "volseg[server]"')
pytest.importorskip("uvicorn", reason='the server is the [server] extra: pip install "volseg[server]"')

from VolSegSlicerLib import testing  # noqa: E402
from VolSegSlicerLib.export import export_labelmap, export_segmentation_file  # noqa: E402
from VolSegSlicerLib.remote import ServerTarget, load_server_target, save_server_target  # noqa: E402
from VolSegSlicerLib.results import model_for_segmentation  # noqa: E402
from VolSegSlicerLib.runner import EngineRunner  # noqa: E402
from VolSegSlicerLib.settings import RunSettings  # noqa: E402
from slicer_scene import CHECK, in_study, load_ct  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slicer-server")
    tls = self_signed(folder)
    os.environ.setdefault("VOLSEG_RUNTIME", "torch")
    srv = ServerProcess(folder / "state", "--jobs-per-token", "4", tls=tls)
    srv.cert = tls[0]
    yield srv
    srv.stop()


@pytest.fixture
def remote_runner(context, server, tmp_path):
    runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path))
    runner.server = ServerTarget(server.url, server.token, str(server.cert))
    yield runner
    runner.shutdown()


def scene_text(context) -> str:
    scene = context.scene
    scene.SetSaveToXMLString(1)
    scene.Commit()
    return scene.GetSceneXMLString()


def test_the_user_chain_runs_on_the_server(context, remote_runner, server, demo, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    volume = load_ct(context)
    in_study(context, volume)
    runs = []

    def segment(outputSegmentation=None, replaceOutput=False):  # a local checkpoint/device choice does not apply
        job = remote_runner.segment(demo, [volume], RunSettings(runOn="server", outputSegmentation=outputSegmentation,
                                                                replaceOutput=replaceOutput, device="cuda:3",
                                                                checkpointPath=str(tmp_path / "local-only.pth")))
        remote_runner.wait_for(job, timeout=240)
        runs.append(job)
        return job

    node = testing.run_user_chain(CHECK, context, segment, lambda n, p: export_labelmap(context, n, p, demo),
                                  lambda n, p: export_segmentation_file(context, n, p), volume, demo, str(tmp_path))
    assert len(runs) == 3 and model_for_segmentation(node, [demo]) is demo
    assert node.GetAttribute("VolSegSlicer.Device").startswith("test-box: ")  # where it ran
    assert all("--server" in job.process.argv and "--checkpoint" not in job.process.argv for job in runs)
    assert node.GetAttribute("VolSegSlicer.Checkpoint") in (None, "")
    for job in runs:  # the token never on a command line, in the log or in the scene
        assert server.token not in " ".join(job.process.argv)
    assert server.token not in caplog.text
    assert server.token not in scene_text(context)
    assert list((server.state / "jobs").iterdir()) == []  # every job fetched and removed


def test_cancel_on_the_server_imports_nothing(context, remote_runner, server, demo) -> None:
    volume = load_ct(context)
    before = testing.scene_snapshot(context)
    settings = RunSettings(runOn="server", useModelSettings=False, roiX=32, roiY=32, roiZ=32, overlap=0.8,
                           swBatchSize=1)
    seen = []
    job = remote_runner.segment(demo, [volume], settings, on_event=lambda j, line: seen.append(j.monitor.stage))
    end = time.monotonic() + 120
    while "infer" not in seen and time.monotonic() < end and job in remote_runner.jobs:
        remote_runner.poll()
        time.sleep(0.05)
    assert "infer" in seen, job.monitor.error
    job.cancel()
    remote_runner.wait_for(job, timeout=30)
    assert job.monitor.outcome == "cancelled" and job.segmentationNode is None
    assert testing.scene_snapshot(context) == before
    assert not os.path.exists(job.tempDir)
    for _ in range(40):  # the server stops the job and removes its files
        if not list((server.state / "jobs").iterdir()):
            break
        time.sleep(0.25)
    assert list((server.state / "jobs").iterdir()) == []


def test_the_model_list_comes_from_the_server_and_bad_settings_are_refused(context, remote_runner, demo) -> None:
    got = {}
    query = remote_runner.query_models("", lambda models, error: got.update(models=models, error=error), on_server=True)
    remote_runner.wait_for(query, timeout=60)
    assert got["error"] == "" and "demo" in [m["id"] for m in got["models"]]
    volume = load_ct(context)
    remote_runner.server = ServerTarget("https://gpu-box:8443", "")
    with pytest.raises(ValueError, match="token"):
        remote_runner.segment(demo, [volume], RunSettings(runOn="server"))
    remote_runner.server = None
    with pytest.raises(ValueError, match="no server"):
        remote_runner.segment(demo, [volume], RunSettings(runOn="server"))
    assert "secret" not in repr(ServerTarget("https://x", "secret-token-value"))  # never in a log line
    stored: dict = {}
    save_server_target(stored.__setitem__, ServerTarget("https://gpu-box:8443", "tok" * 15, "/ca.pem"))
    assert load_server_target(lambda key, default: stored.get(key, default)) == ServerTarget(
        "https://gpu-box:8443", "tok" * 15, "/ca.pem")
