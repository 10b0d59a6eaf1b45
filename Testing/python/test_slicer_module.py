"""The Slicer module's logic outside Slicer.

Part 1 tests the pure-Python pieces in ``VolSegSlicer/VolSegSlicerLib`` (progress protocol,
background process with tree kill, command lines, model list, devices, resources).
Part 2 runs the engine runner the module's logic delegates to on slicer-core's scene (real
volume nodes, real engine processes, real import): progress, results, cancellation and the warm
worker. The whole user chain on real MRML is in ``test_slicer_chain.py``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import psutil  # noqa: E402

from VolSegSlicerLib import process as process_module  # noqa: E402
from VolSegSlicerLib.catalog import (  # noqa: E402
    duplicate_inputs,
    filter_models,
    import_segment_ids,
    input_titles,
    model_tooltip_html,
    parse_models_json,
    prefill_inputs,
    segment_rows,
)
from VolSegSlicerLib.command import (  # noqa: E402
    SegmentOptions,
    cancel_request_line,
    engine_command,
    engine_environment,
    segment_args,
    serve_request_line,
)
from VolSegSlicerLib.devices import device_choices, device_text  # noqa: E402
from VolSegSlicerLib.jobs import EngineQuery, SegmentationJob  # noqa: E402
from VolSegSlicerLib.process import EngineProcess, kill_process_tree, python_executable  # noqa: E402
from VolSegSlicerLib.protocol import (  # noqa: E402
    RunMonitor,
    eta_text,
    format_duration,
    overall_fraction,
    parse_line,
)
from VolSegSlicerLib.resources import (  # noqa: E402
    LogBuffer,
    missing_requirements,
    read_requirements,
    requirement_name,
    resource_dir,
)

POSIX = os.name == "posix"


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def _poll_until(process: EngineProcess, predicate, timeout: float = 20.0) -> list:
    events = []
    end = time.monotonic() + timeout
    while not predicate(events):
        events += process.poll()
        assert time.monotonic() < end, f"timed out; events so far: {[e.text for e in events]}"
        time.sleep(0.02)
    return events


# A child that starts a sleeping grandchild and reports its pid: a small process tree.
TREE_CHILD = """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(grandchild.pid, flush=True)
    time.sleep(60)
"""


# ---------------------------------------------------------------------------------------- protocol
def test_parse_line_separates_protocol_events_from_other_output() -> None:
    stage = parse_line('{"event": "stage", "stage": "infer", "message": "go"}\n')
    assert (stage.kind, stage.data["stage"], stage.stream) == ("stage", "infer", "stdout")
    assert parse_line("plain text").kind == "text"
    assert parse_line('{"event": "stage"', "stdout").kind == "text"  # malformed JSON
    assert parse_line('{"event": "surprise"}').kind == "text"  # unknown event
    assert parse_line('{"event": "done"}', "stderr").kind == "text"  # only stdout carries the protocol
    tagged = parse_line('{"event": "log", "level": "info", "message": "m", "request": "r7"}')
    assert tagged.request == "r7" and parse_line("x").request is None


def test_durations_and_time_left_read_naturally() -> None:
    assert format_duration(42.4) == "42 s"
    assert format_duration(65) == "1 min 05 s"
    assert format_duration(3720) == "1 h 02 min"
    assert format_duration(None) == "unknown" and format_duration(float("nan")) == "unknown"
    assert eta_text(None) == "estimating time left"
    assert eta_text(0.2) == "almost done"
    assert eta_text(125) == "about 2 min 05 s left"


def test_overall_fraction_gives_inference_most_of_the_bar() -> None:
    assert overall_fraction("read", 0.0) == 0.0
    assert overall_fraction("infer", 0.0) == pytest.approx(0.20)  # read, load_model, preprocess, convert before
    assert overall_fraction("infer", 0.5) == pytest.approx(0.55)
    assert overall_fraction("convert", 0.0) == pytest.approx(0.15)
    assert overall_fraction("write", 1.0) == pytest.approx(1.0)
    assert overall_fraction("unknown-stage", 0.5) == 0.0


def test_run_monitor_follows_a_successful_run() -> None:
    monitor = RunMonitor()
    lines = [
        '{"event": "stage", "stage": "read", "message": "reading 1 input(s)"}',
        '{"event": "stage", "stage": "infer", "message": "inference: 20 windows"}',
        '{"event": "progress", "stage": "infer", "fraction": 0.4, "done": 8, "total": 20, "elapsed_s": 3.0,'
        ' "eta_s": 4.6}',
        '{"event": "log", "level": "warning", "message": "demonstration model"}',
        '{"event": "done", "outputs": {"segmentation": "/t/s.nrrd", "probabilities": null}, "elapsed_s": 9.2,'
        ' "timings": {}, "device": "cpu", "labels_present": [1, 2]}',
    ]
    percents, logged = [], []
    for line in lines:
        logged.append(monitor.feed(parse_line(line)))
        percents.append(monitor.percent)
        if '"progress"' in line:
            assert monitor.status == "Running the network: 8/20 windows, about 5 s left"
    assert percents == sorted(percents) and percents[-1] == 100
    assert percents[2] == int(100 * overall_fraction("infer", 0.4))
    assert logged[0] == "[read] reading 1 input(s)" and logged[2] is None
    assert logged[3] == "Warning: demonstration model"
    assert monitor.outcome == "done" and monitor.result["labels_present"] == [1, 2]
    assert logged[4] == "Finished in 9 s on cpu"


def test_run_monitor_reports_errors_cancels_and_silent_crashes() -> None:
    failed = RunMonitor()
    failed.feed(parse_line('{"event": "error", "message": "no such file", "hint": "check the path", "exit_code": 2}'))
    assert (failed.outcome, failed.error, failed.hint) == ("error", "no such file", "check the path")
    assert failed.exit_code == 2

    cancelled = RunMonitor()
    cancelled.feed(parse_line('{"event": "error", "message": "cancelled", "hint": null, "exit_code": 130}'))
    assert cancelled.outcome == "cancelled" and cancelled.hint == ""

    crashed = RunMonitor()
    crashed.feed(parse_line("Traceback (most recent call last):", "stderr"))
    crashed.feed(parse_line("MemoryError", "stderr"))
    crashed.process_exited(-9)
    assert crashed.outcome == "error" and "exit code -9" in crashed.error and "MemoryError" in crashed.error

    killed_on_request = RunMonitor()
    killed_on_request.process_exited(-9, cancel_requested=True)
    assert killed_on_request.outcome == "cancelled"


# ---------------------------------------------------------------------------------------- processes
def test_kill_process_tree_kills_child_and_grandchild(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, str(_script(tmp_path, "tree.py", TREE_CHILD))],
                             stdout=subprocess.PIPE, text=True)
    grandchild_pid = int(child.stdout.readline())
    assert not _gone(child.pid) and not _gone(grandchild_pid)
    kill_process_tree(child.pid)
    child.wait(timeout=5)
    assert _wait_gone([child.pid, grandchild_pid])


def test_engine_process_kill_stops_the_whole_tree(tmp_path: Path) -> None:
    proc = EngineProcess([sys.executable, str(_script(tmp_path, "tree.py", TREE_CHILD))]).start()
    events = _poll_until(proc, lambda ev: any(e.kind == "text" and e.text.strip() for e in ev))
    grandchild_pid = int(events[0].text)
    proc.kill()
    assert _wait_gone([proc.pid, grandchild_pid])
    _poll_until(proc, lambda ev: proc.finished)


@pytest.mark.skipif(not POSIX, reason="the process-group fallback is the POSIX path (Windows uses taskkill /T)")
def test_tree_kill_without_psutil_uses_the_process_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(process_module, "psutil", None)
    proc = EngineProcess([sys.executable, str(_script(tmp_path, "tree.py", TREE_CHILD))]).start()
    events = _poll_until(proc, lambda ev: any(e.text.strip() for e in ev))
    grandchild_pid = int(events[0].text)
    proc.kill()
    assert _wait_gone([proc.pid, grandchild_pid])


@pytest.mark.skipif(not POSIX, reason="process groups are POSIX")
def test_tree_kill_without_psutil_never_kills_the_callers_group(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(process_module, "psutil", None)
    child = subprocess.Popen([sys.executable, str(_script(tmp_path, "tree.py", TREE_CHILD))],
                             stdout=subprocess.PIPE, text=True)  # shares this test's process group
    grandchild_pid = int(child.stdout.readline())
    try:
        kill_process_tree(child.pid)
        child.wait(timeout=5)
        assert child.returncode == -9 and _gone(child.pid)  # the child itself, and this process survived
    finally:
        os.kill(grandchild_pid, 9)


def test_engine_process_streams_lines_without_blocking(tmp_path: Path) -> None:
    child = _script(tmp_path, "talker.py", """
        import json, sys, time
        print(json.dumps({"event": "stage", "stage": "read", "message": "r"}), flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        time.sleep(1.0)
        print(json.dumps({"event": "done", "outputs": {}, "elapsed_s": 1.0}), flush=True)
    """)
    proc = EngineProcess([sys.executable, str(child)]).start()
    events = _poll_until(proc, lambda ev: len(ev) >= 2)
    started = time.monotonic()
    assert proc.poll() == []  # the child is sleeping: nothing new, and poll returns at once
    assert time.monotonic() - started < 0.05
    assert not proc.finished
    events += proc.wait(timeout=20)
    kinds = sorted((e.kind, e.stream) for e in events)
    assert kinds == [("done", "stdout"), ("stage", "stdout"), ("text", "stderr")]
    assert proc.returncode == 0 and proc.finished


@pytest.mark.skipif(not POSIX, reason="SIGTERM delivery to the process group is POSIX")
def test_cancel_is_graceful_first(tmp_path: Path) -> None:
    child = _script(tmp_path, "graceful.py", """
        import json, signal, sys, time
        def stop(signum, frame):
            print(json.dumps({"event": "error", "message": "cancelled; nothing was written", "hint": None,
                              "exit_code": 130}), flush=True)
            sys.exit(130)
        signal.signal(signal.SIGTERM, stop)
        print(json.dumps({"event": "stage", "stage": "infer", "message": "inference"}), flush=True)
        time.sleep(60)
    """)
    proc = EngineProcess([sys.executable, str(child)]).start()
    job = SegmentationJob(proc)
    end = time.monotonic() + 20
    while job.monitor.stage != "infer":
        job.poll()
        assert time.monotonic() < end
        time.sleep(0.02)
    job.cancel()
    while not job.poll():
        assert time.monotonic() < end
        time.sleep(0.02)
    assert job.monitor.outcome == "cancelled" and proc.returncode == 130


def test_cancel_kills_an_engine_that_ignores_the_stop_request(tmp_path: Path) -> None:
    child = _script(tmp_path, "stubborn.py", """
        import signal, time
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = EngineProcess([sys.executable, str(child)]).start()
    _poll_until(proc, lambda ev: any(e.text == "ready" for e in ev))
    started = time.monotonic()
    proc.cancel(grace_s=0.3)
    _poll_until(proc, lambda ev: proc.finished, timeout=10)
    assert time.monotonic() - started < 5
    assert proc.returncode != 0 and _gone(proc.pid)


def test_send_line_reaches_the_process(tmp_path: Path) -> None:
    child = _script(tmp_path, "echo.py", """
        import sys
        for line in sys.stdin:
            print("got " + line.strip(), flush=True)
    """)
    proc = EngineProcess([sys.executable, str(child)], stdin_pipe=True).start()
    proc.send_line('{"id": "r1"}')
    events = _poll_until(proc, lambda ev: any(e.text.startswith("got") for e in ev))
    assert events[-1].text == 'got {"id": "r1"}'
    proc.close()  # closes stdin: the child ends on EOF
    assert proc.returncode == 0
    with pytest.raises(RuntimeError):
        EngineProcess([sys.executable, "-c", "pass"]).start().send_line("x")


def test_python_executable_outside_slicer_is_this_python(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert python_executable() == sys.executable


# ---------------------------------------------------------------------------------------- command lines
def test_segment_args_use_the_card_settings_by_default() -> None:
    args = segment_args(SegmentOptions(model="/cards/demo.json", inputs=["/t/in0.nrrd"], output="/t/out.nrrd"))
    assert args == ["segment", "/t/in0.nrrd", "--model", "/cards/demo.json", "-o", "/t/out.nrrd",
                    "--progress", "json", "--device", "auto"]


def test_segment_args_are_understood_by_the_engine_cli() -> None:
    from volseg.cli.parser import build_parser

    opts = SegmentOptions(model="demo", inputs=["a.nrrd", "b.nrrd"], output="o.nrrd", checkpoint="w.pt",
                          device="cuda:1", use_model_settings=False, overlap=0.625, roi_size=(96, 96, 64),
                          sw_batch_size=2, flips=True, amp=False, keep_largest=True, fill_holes=False,
                          min_island_mm3=50.0, cards_dir="/my/cards", overwrite=True)
    parsed = build_parser().parse_args(segment_args(opts))
    assert parsed.command == "segment"
    assert [str(p) for p in parsed.inputs] == ["a.nrrd", "b.nrrd"]
    assert (parsed.model, str(parsed.checkpoint), parsed.device, parsed.progress) == ("demo", "w.pt", "cuda:1", "json")
    assert (parsed.overlap, parsed.roi_size, parsed.sw_batch_size) == (0.625, [96, 96, 64], 2)
    assert (parsed.flips, parsed.amp, parsed.keep_largest, parsed.fill_holes) == (True, False, True, False)
    assert parsed.min_island_mm3 == 50.0 and parsed.cards_dir == ["/my/cards"] and parsed.overwrite


def test_segment_args_skip_unset_window_settings() -> None:
    opts = SegmentOptions(model="m", inputs=["a"], output="o", use_model_settings=False, roi_size=(96, 0, 64))
    args = segment_args(opts)
    assert "--roi-size" not in args and "--sw-batch-size" not in args and "--min-island-mm3" not in args
    assert "--no-flips" in args and "--amp" in args
    with pytest.raises(ValueError):
        segment_args(SegmentOptions(model="m", inputs=[], output="o"))


def test_serve_request_drops_the_command_and_progress() -> None:
    request = json.loads(serve_request_line("r3", SegmentOptions(model="m", inputs=["a"], output="o")))
    assert request == {"id": "r3", "args": ["a", "--model", "m", "-o", "o", "--device", "auto"]}
    assert json.loads(cancel_request_line("r3")) == {"cancel": "r3"}


def test_engine_environment_puts_the_module_dir_first() -> None:
    env = engine_environment("/slicer/modules/VolSegSlicer", {"PYTHONPATH": os.pathsep.join(["/x", "/y"]), "A": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/slicer/modules/VolSegSlicer", "/x", "/y"]
    assert env["A"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert engine_command("/py", ["models", "--json"]) == ["/py", "-m", "volseg", "models", "--json"]


# ---------------------------------------------------------------------------------------- model list
@pytest.fixture(scope="module")
def tiny_cards(tmp_path_factory) -> Path:
    """Two cards for a tiny randomly initialised MONAI SegResNet (weights written here)."""
    import torch
    from monai.networks.nets import SegResNet
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    config = dict(spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=[1, 1], blocks_up=[1])
    save_file({k: v.contiguous() for k, v in SegResNet(**config).state_dict().items()}, folder / "tiny.safetensors")
    base = {
        "modality": "CT", "architecture": {"name": "segresnet", "config": config},
        "checkpoint": {"path": "tiny.safetensors"},
        "inputs": [{"name": "CT", "modality": "CT", "name_hint": "ct|chest"}],
        "labels": [
            {"value": 1, "name": "Liver", "color": [220, 60, 60],
             "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                             "type": ["SCT", "10200004", "Liver"]}},
            {"value": 2, "name": "Spleen", "color": [60, 200, 60]},
        ],
        "preprocessing": [{"name": "ScaleIntensityRange",
                           "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}],
    }
    # One window over the whole 128x128x34 CT: a fast run.
    fast = dict(base, id="tiny-fast", title="Tiny test network (one window)",
                inference={"roi_size": [128, 128, 48], "overlap": 0.0, "sw_batch_size": 1})
    # Hundreds of small windows: a run that lasts long enough to be cancelled.
    slow = dict(base, id="tiny-slow", title="Tiny test network (many windows)",
                inference={"roi_size": [16, 16, 8], "overlap": 0.5, "sw_batch_size": 1})
    for card in (fast, slow):
        (folder / f"{card['id']}.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def _run_cli(args: list[str]) -> str:
    env = engine_environment(str(MODULE_DIR))
    done = subprocess.run(engine_command(sys.executable, args), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def models(tiny_cards: Path) -> list[dict]:
    """The real ``volseg models --json`` output, parsed as the panel does."""
    return parse_models_json(_run_cli(["models", "--json", "--cards-dir", str(tiny_cards)]))


def test_model_list_comes_from_the_engine(models: list[dict]) -> None:
    ids = {m["id"] for m in models}
    assert {"demo", "tiny-fast", "tiny-slow"} <= ids
    with pytest.raises(ValueError):
        parse_models_json('{"cards": []}')


def test_search_matches_every_word_in_any_field(models: list[dict]) -> None:
    assert {m["id"] for m in filter_models(models, "tiny many")} == {"tiny-slow"}
    assert {m["id"] for m in filter_models(models, "SPLEEN one window")} == {"tiny-fast"}  # label name + title
    assert filter_models(models, "tiny brain-that-is-not-there") == []
    assert len(filter_models(models, "")) == len(models)


def test_tooltip_is_an_escaped_model_card(models: list[dict]) -> None:
    tiny = next(m for m in models if m["id"] == "tiny-fast")
    html = model_tooltip_html(tiny)
    assert "Architecture: segresnet" in html and "Labels (2): Liver, Spleen" in html and "Modality: CT" in html
    demo = next(m for m in models if m["id"] == "demo")
    assert "not for use on patients" in model_tooltip_html(demo)
    hostile = dict(tiny, title="<script>x</script>", timing={"gpu_s": 12, "cpu_s": 300})
    html = model_tooltip_html(hostile)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "GPU about 12 s, CPU about 5 min 00 s" in html
    noted = dict(tiny, checkpoint={"published_at": "https://x (see the notes)", "notes": "use <its> pytorch_model.bin"})
    assert "Checkpoint notes: use &lt;its&gt; pytorch_model.bin" in model_tooltip_html(noted)  # shown where users look


def test_inputs_are_titled_and_prefilled_from_name_hints() -> None:
    model = {"inputs": [{"name": "T1", "modality": "MR", "name_hint": "t1(?!.*gd)"},
                        {"name": "T1 contrast", "modality": "MR", "name_hint": "t1.*gd|t1c"},
                        {"name": "FLAIR", "name_hint": "flair"},
                        {"name": "T2", "name_hint": "[bad regex"},
                        {"name": "extra"}]}
    assert input_titles(model) == ["T1 (MR)", "T1 contrast (MR)", "FLAIR", "T2"]  # at most 4 selectors
    names = ["patient FLAIR", "T1_Gd", "T1 pre", "t2"]
    assert prefill_inputs(model, names) == [2, 1, 0, None]
    # The same volume is never proposed twice, and a single input takes the first volume if no hint fits.
    assert prefill_inputs({"inputs": [{"name": "a", "name_hint": "x"}, {"name": "b", "name_hint": "x"}]},
                          ["x1"]) == [0, None]
    assert prefill_inputs({"inputs": [{"name": "CT", "name_hint": "ct"}]}, ["MRHead"]) == [0]


def test_duplicate_inputs_are_found() -> None:
    assert duplicate_inputs(["vtkMRMLScalarVolumeNode1", None, "vtkMRMLScalarVolumeNode1"]) == [(0, 2)]
    assert duplicate_inputs(["a", "b", None, None]) == []


def test_segment_rows_carry_card_names_colours_and_terminology(models: list[dict]) -> None:
    tiny = next(m for m in models if m["id"] == "tiny-fast")
    rows = segment_rows(tiny)
    assert [(r["id"], r["value"], r["name"]) for r in rows] == [("Segment_1", 1, "Liver"), ("Segment_2", 2, "Spleen")]
    assert rows[0]["color"] == pytest.approx((220 / 255, 60 / 255, 60 / 255))
    parts = rows[0]["terminology_tag"].split("~")
    assert len(parts) == 7 and parts[1] == "SCT^123037004^Anatomical Structure" and parts[2] == "SCT^10200004^Liver"
    assert rows[1]["terminology_tag"] == ""
    assert import_segment_ids(rows, [0, 2, 1, 2]) == ["Segment_1", "Segment_2"]
    assert import_segment_ids(rows, [0]) == []
    # Slicer fills the i-th id with value i + 1: a value missing from the result keeps its place.
    assert import_segment_ids(rows, [2]) == ["Segment_1", "Segment_2"]
    sparse = [{"value": 3, "id": "A"}, {"value": 5, "id": "B"}]
    assert import_segment_ids(sparse, [5]) == ["", "", "A", "", "B"]
    with pytest.raises(ValueError, match=r"\[7\]"):
        import_segment_ids(rows, [1, 7])


# ---------------------------------------------------------------------------------------- devices
def test_device_choices_from_the_engine_and_from_a_gpu_machine() -> None:
    choices = device_choices(_run_cli(["devices", "--json"]))
    assert choices.items[0][0] == "auto" and "cpu" in [i for i, _ in choices.items]
    assert choices.reason  # the engine always says why
    gpu = device_choices({"devices": [
        {"id": "cpu", "name": "CPU", "total_memory_mb": None, "free_memory_mb": None},
        {"id": "cuda:0", "name": "NVIDIA H100", "total_memory_mb": 81559, "free_memory_mb": 72000},
        {"id": "mps", "name": "Apple M2", "total_memory_mb": None, "free_memory_mb": None}],
        "auto": "cuda:0", "reason": "the GPU with the most free memory"})
    assert gpu.items == [("auto", "Automatic (cuda:0)"), ("cuda:0", "cuda:0: NVIDIA H100 (70.3 of 79.6 GB free)"),
                         ("mps", "mps: Apple M2"), ("cpu", "CPU")]
    no_free = {"id": "cuda:1", "name": "A", "total_memory_mb": 2048, "free_memory_mb": None}
    assert device_text(no_free) == "cuda:1: A (2.0 GB)"
    with pytest.raises(ValueError):
        device_choices('{"gpus": []}')


# ---------------------------------------------------------------------------------------- resources
def test_resources_are_found_in_a_checkout_and_in_a_build(tmp_path: Path) -> None:
    assert resource_dir(MODULE_DIR) == REPO_ROOT / "Resources"  # source checkout: ../Resources
    built = tmp_path / "qt-scripted-modules"
    (built / "Resources" / "UI").mkdir(parents=True)
    assert resource_dir(built) == built / "Resources"  # CMake build: beside the module file
    with pytest.raises(FileNotFoundError):
        resource_dir(tmp_path / "nowhere" / "module")


def test_requirements_file_lists_engine_packages_but_not_torch_or_slicer_bundled_ones() -> None:
    requirements = read_requirements(REPO_ROOT / "Resources" / "requirements.txt")
    names = {requirement_name(r).lower() for r in requirements}
    assert {"monai", "nibabel", "pynrrd", "slicerio", "safetensors", "jsonschema", "psutil"} <= names
    assert not names & {"torch", "simpleitk", "numpy"}
    assert missing_requirements(["numpy>=1.0"]) == []
    assert missing_requirements(["numpy>=999"]) == ["numpy>=999"]
    assert missing_requirements(["surely-not-installed-volseg-pkg"]) == ["surely-not-installed-volseg-pkg"]


def test_log_buffer_is_capped() -> None:
    log = LogBuffer(limit=100)
    for i in range(50):
        log.append(f"line {i:02d}")
    text = log.text()
    assert "line 49" in text and "line 00" not in text and log.dropped > 0
    assert len(text) < 100 + 60  # the cap plus the "older lines" note
    log.clear()
    assert log.text() == ""


# ---------------------------------------------------------------------------------------- the runner on slicer-core
# The module's Logic is a thin adapter over EngineRunner (VolSegSlicerLib/runner.py): these tests
# run it on slicer-core's scene with real volume nodes and real engine processes.
@pytest.fixture
def runner(context, tmp_path: Path):
    from VolSegSlicerLib.runner import EngineRunner

    made = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path))
    yield made
    made.shutdown()


def _volume(context, ct_path: Path, name: str = "CTChest"):
    return context.volumes_logic.AddArchetypeVolume(str(ct_path), name, 0)


def test_settings_round_trip_through_the_application_settings() -> None:
    from VolSegSlicerLib.settings import RunSettings, restore_settings, save_settings

    store: dict = {}
    params = RunSettings(overlap=0.75, flips=True, roiX=96, device="cuda:0")
    params.modelId = "demo"
    save_settings(params, store.__setitem__)
    fresh = RunSettings()
    assert restore_settings(fresh, lambda key, default: store.get(key, default)) == []
    assert (fresh.overlap, fresh.flips, fresh.roiX, fresh.device, fresh.modelId) == (0.75, True, 96, "cuda:0", "demo")
    store["Advanced"] = '{"overlap": "lots", "flips": 1, "roiX": 64}'  # another version's values
    other = RunSettings()
    assert sorted(restore_settings(other, lambda key, default: store.get(key, default))) == ["flips", "overlap"]
    assert (other.overlap, other.flips, other.roiX) == (0.5, False, 64)
    assert restore_settings(RunSettings(), lambda key, default: "{broken" if key == "Advanced" else default)


def test_engine_options_follow_the_panel(models: list[dict]) -> None:
    from VolSegSlicerLib.settings import RunSettings, segment_options

    tiny = next(m for m in models if m["id"] == "tiny-fast")
    params = RunSettings(checkpointPath="/w/best.pt", device="cpu")
    opts = segment_options(tiny, ["/t/in0.nrrd"], "/t/out.nrrd", params)
    assert opts.model == tiny["card_path"] and opts.checkpoint == "/w/best.pt" and opts.use_model_settings
    params.useModelSettings, params.roiX, params.roiY, params.roiZ, params.fillHoles = False, 64, 64, 32, True
    args = segment_args(segment_options(tiny, ["/t/in0.nrrd"], "/t/out.nrrd", params))
    assert args[args.index("--roi-size") + 1:args.index("--roi-size") + 4] == ["64", "64", "32"]
    assert "--fill-holes" in args and "--overlap" in args


def test_segment_refuses_wrong_or_repeated_inputs(runner, context, models: list[dict], ct_path: Path) -> None:
    from VolSegSlicerLib.settings import RunSettings

    two_inputs = dict(next(m for m in models if m["id"] == "tiny-fast"), inputs=[{"name": "T1"}, {"name": "T2"}])
    same = _volume(context, ct_path)
    with pytest.raises(ValueError, match="same volume"):
        runner.segment(two_inputs, [same, same], RunSettings())
    with pytest.raises(ValueError, match="needs 2 input"):
        runner.segment(two_inputs, [same], RunSettings())
    assert runner.jobs == []


def test_models_query_runs_in_the_background(runner, tiny_cards: Path) -> None:
    received, started = {}, []
    runner.on_activity = lambda: started.append(True)
    query = runner.query_models(str(tiny_cards), lambda result, error: received.update(result=result, error=error))
    assert started and received == {}  # asked, not answered yet: nothing blocked; the timer was started
    assert isinstance(query, EngineQuery)
    runner.wait_for(query, timeout=120)
    assert received["error"] == "" and {"tiny-fast", "demo"} <= {m["id"] for m in received["result"]}
    assert runner.models == received["result"] and not runner.poll()


def _plant_engine(folder: Path, marker: Path) -> None:
    """A ``volseg`` package another local user leaves in a shared folder: it would run as the
    Slicer user, writing ``marker``, if ``python -m volseg`` found it first."""
    package = folder / "volseg"
    package.mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (package / "__init__.py").write_text(code)
    (package / "__main__.py").write_text(code)


def test_a_volseg_package_planted_in_the_temporary_folder_never_runs(runner, tiny_cards: Path, tmp_path: Path) -> None:
    """Issue 18 (3): the panel asks `models --json` as it opens; today the engine starts in the
    (shared, predictable) temporary folder and `-m` runs the planted package from there."""
    marker = tmp_path / "PWNED"
    _plant_engine(Path(runner.temp_root), marker)
    received: dict = {}
    runner.wait_for(runner.query_models(str(tiny_cards), lambda r, e: received.update(result=r, error=e)), timeout=120)
    assert not marker.exists()
    assert received["error"] == "" and "tiny-fast" in {m["id"] for m in received["result"]}
    work = Path(runner.working_dir())  # a private working folder of the runner's own
    assert work.parent == Path(runner.temp_root) and os.stat(work).st_mode & 0o777 == 0o700
    runner.shutdown()
    assert not work.exists()


def test_the_engine_ignores_a_planted_package_in_its_working_folder(tmp_path: Path) -> None:
    """Even started in a folder someone else could write, `python -m volseg` runs the engine:
    PYTHONSAFEPATH keeps the working folder off sys.path (Python 3.11+, as in Slicer 5.10)."""
    if sys.version_info < (3, 11):
        pytest.skip("PYTHONSAFEPATH needs Python 3.11 (the runner's private working folder covers 3.10)")
    marker = tmp_path / "PWNED"
    _plant_engine(tmp_path / "shared", marker)
    env = engine_environment(str(MODULE_DIR))
    assert env["PYTHONSAFEPATH"] == "1"
    done = subprocess.run(engine_command(sys.executable, ["models", "--json"]), env=env, cwd=tmp_path / "shared",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not marker.exists() and "demo" in {m["id"] for m in parse_models_json(done.stdout)}


def test_segmentation_runs_in_a_background_engine_process(runner, context, models: list[dict], ct_path: Path,
                                                          monkeypatch) -> None:
    from VolSegSlicerLib.settings import RunSettings

    tiny = next(m for m in models if m["id"] == "tiny-fast")
    engine_table = {}
    original = runner._import

    def read_engine_table_then_import(job):  # the engine's colour table agrees with the segments made here
        with open(Path(job.outputPath).with_suffix(".csv"), newline="", encoding="utf-8") as table:
            engine_table.update({int(r["LabelValue"]): r for r in csv.DictReader(table)})
        original(job)

    monkeypatch.setattr(runner, "_import", read_engine_table_then_import)
    events, finished = [], []
    job = runner.segment(tiny, [_volume(context, ct_path)], RunSettings(device="cpu"),
                         on_event=lambda j, line: events.append(line), on_finished=finished.append)
    assert isinstance(job, SegmentationJob) and job.ownsProcess and not job.finished
    assert Path(job.tempDir, "input0.nrrd").is_file()  # the input was written for the engine
    runner.wait_for(job, timeout=180)
    assert finished == [job] and job.finished
    assert job.monitor.outcome == "done", job.monitor.error
    assert job.monitor.percent == 100 and job.segmentationNode is not None
    assert job.segmentationNode.GetSegmentation().GetNumberOfSegments() == len(tiny["labels"])
    assert any(line and line.startswith("[infer]") for line in events)
    for row in segment_rows(tiny):
        entry = engine_table[row["value"]]
        assert entry["Name"] == row["name"]
        assert [int(entry[f"Color_{c}"]) / 255 for c in "RGB"] == pytest.approx(row["color"])
        codes = row["terminology_tag"].split("~")
        assert (codes[2] if row["terminology_tag"] else "^^") == "^".join(
            entry[f"Type_{k}"] for k in ("CodingScheme", "CodeValue", "CodeMeaning"))
    assert not Path(job.tempDir).exists()  # temporaries removed
    assert _gone(job.process.pid)


def test_cancel_stops_the_engine_and_writes_nothing(runner, context, models: list[dict], ct_path: Path) -> None:
    from VolSegSlicerLib.settings import RunSettings

    slow = next(m for m in models if m["id"] == "tiny-slow")
    job = runner.segment(slow, [_volume(context, ct_path)], RunSettings(device="cpu"))
    end = time.monotonic() + 120
    while job.monitor.stage != "infer" or job.monitor.percent <= int(100 * overall_fraction("infer", 0.0)):
        runner.poll()
        assert job in runner.jobs, f"the run ended before it could be cancelled: {job.monitor.error}"
        assert time.monotonic() < end
        time.sleep(0.05)
    output, temp_dir = Path(job.outputPath), Path(job.tempDir)
    started = time.monotonic()
    job.cancel()
    runner.wait_for(job, timeout=30)
    assert time.monotonic() - started < 15
    assert job.monitor.outcome == "cancelled" and job.segmentationNode is None
    assert job.monitor.exit_code == 130  # the engine stopped cleanly on SIGTERM
    assert not output.exists() and not temp_dir.exists()
    assert _gone(job.process.pid)
    assert context.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_warm_worker_keeps_running_between_runs(runner, context, models: list[dict], ct_path: Path) -> None:
    from VolSegSlicerLib.settings import RunSettings

    tiny = next(m for m in models if m["id"] == "tiny-fast")
    settings = RunSettings(device="cpu", keepWarm=True)
    first = runner.wait_for(runner.segment(tiny, [_volume(context, ct_path)], settings), timeout=180)
    assert first.monitor.outcome == "done", first.monitor.error
    worker = runner.warm_worker
    assert worker is not None and worker.is_running() and not first.ownsProcess
    second = runner.wait_for(runner.segment(tiny, [_volume(context, ct_path, "CT 2")], settings), timeout=180)
    assert second.monitor.outcome == "done", second.monitor.error
    assert runner.warm_worker is worker and worker.is_running()  # same process, model kept loaded
    assert second.request != first.request
    assert first.segmentationNode is not second.segmentationNode
    runner.shutdown()
    assert _wait_gone([worker.pid])
