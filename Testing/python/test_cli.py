"""The command line as a user and the Slicer module run it: JSON progress, cancellation,
clear errors with exit codes, and nothing written on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_card
from volseg.cli.main import main

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run_cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volseg", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env=ENV)


@pytest.fixture
def small_ct(tmp_path) -> Path:
    a = np.zeros((24, 20, 12), np.int16) - 1000
    a[4:12, 6:14, 2:8] = 800
    img = sitk.GetImageFromArray(a.transpose(2, 1, 0))
    img.SetSpacing((1.5, 1.5, 3.0))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def threshold_card(tmp_path) -> Path:
    scale = {"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}
    return make_card(tmp_path, "thr", preprocessing=[scale])


def parse_event(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise AssertionError(f"stdout line is not a JSON event: {line!r}") from None


def events(stdout: str) -> list[dict]:
    return [parse_event(line) for line in stdout.splitlines() if line.strip()]


def test_progress_json_protocol(small_ct, threshold_card, threshold_torchscript, tmp_path):
    out = tmp_path / "res.seg.nrrd"
    r = run_cli("segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
                "-o", str(out), "--progress", "json", "--roi-size", "8", "8", "8")
    assert r.returncode == 0, r.stderr
    ev = events(r.stdout)  # every stdout line must be JSON
    stages = [e["stage"] for e in ev if e["event"] == "stage"]
    assert stages == ["read", "load_model", "preprocess", "infer", "postprocess", "write"]
    progress = [e for e in ev if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] and progress[-1]["fraction"] == 1.0
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions)
    assert all(p["eta_s"] is None or p["eta_s"] >= 0 for p in progress)
    done = ev[-1]
    assert done["event"] == "done" and done["outputs"]["segmentation"] == str(out)
    assert done["labels_present"] == [1]
    assert set(done["timings"]) == set(stages)
    assert out.exists()


def test_sigterm_cancels_cleanly_and_writes_nothing(tmp_path, threshold_torchscript):
    a = np.zeros((64, 64, 48), np.float32)
    img = sitk.GetImageFromArray(a)
    src = tmp_path / "big.nrrd"
    sitk.WriteImage(img, str(src))
    card = make_card(tmp_path, "slow", inference={"roi_size": [4, 4, 4], "overlap": 0.75, "sw_batch_size": 1})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "volseg", "segment", str(src), "--model", str(card),
                             "--checkpoint", str(threshold_torchscript), "-o", str(out_dir / "res.nii.gz"),
                             "--progress", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(parse_event(line))
        if seen[-1]["event"] == "progress" and seen[-1]["done"] >= 5:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    seen += events(rest)
    assert proc.returncode == 130
    assert seen[-1]["event"] == "error" and "cancelled" in seen[-1]["message"]
    assert list(out_dir.iterdir()) == []  # no output, no temporary file


def test_errors_are_one_message_with_exit_code(small_ct, tmp_path, threshold_card, threshold_torchscript, capsys):
    out = tmp_path / "x.nii.gz"
    cases = [
        (["segment", str(tmp_path / "missing.nrrd"), "--model", str(threshold_card),
          "--checkpoint", str(threshold_torchscript), "-o", str(out)], "missing.nrrd"),
        (["segment", str(small_ct), "--model", "no-such-model", "-o", str(out)], "unknown model"),
        (["segment", str(small_ct), str(small_ct), "--model", str(threshold_card),
          "--checkpoint", str(threshold_torchscript), "-o", str(out)], "channel"),
        (["segment", str(small_ct), "--model", str(threshold_card), "-o", str(out)], "checkpoint"),
        (["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
          "-o", str(tmp_path / "x.png")], "png"),
        (["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
          "-o", str(out), "--overlap", "1.5"], "overlap"),
        (["segment", str(small_ct), "--arch", "unet", "-o", str(out)], "--num-labels"),
        (["segment", str(small_ct), "--arch", "nosucharch", "--num-labels", "2", "--checkpoint",
          str(threshold_torchscript), "-o", str(out)], "unknown architecture"),
    ]
    for args, needle in cases:  # in-process: an unexpected exception would escape main() and fail here
        assert main(args + ["--progress", "none"]) == 2, args
        err = capsys.readouterr().err
        assert needle.lower() in err.lower(), (needle, err)
        assert not out.exists()


def test_error_event_in_json_mode(small_ct, tmp_path):
    r = run_cli("segment", str(small_ct), "--model", "no-such-model", "-o", str(tmp_path / "o.nrrd"), "--progress", "json")
    assert r.returncode == 2
    last = events(r.stdout)[-1]
    assert last["event"] == "error" and last["exit_code"] == 2 and "unknown model" in last["message"]


def test_card_with_typo_is_explained(tmp_path, small_ct):
    card = make_card(tmp_path, "typo", infrence={"roi_size": [8, 8, 8]})
    r = run_cli("segment", str(small_ct), "--model", str(card), "-o", str(tmp_path / "o.nrrd"))
    assert r.returncode == 2
    assert "infrence" in r.stderr and "allowed:" in r.stderr and "Traceback" not in r.stderr


def test_existing_output_is_not_overwritten(small_ct, threshold_card, threshold_torchscript, tmp_path):
    out = tmp_path / "res.nii.gz"
    out.write_bytes(b"precious")
    args = ["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
            "-o", str(out), "--progress", "none"]
    assert main(args) == 2
    assert out.read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert out.read_bytes() != b"precious"


def test_arch_without_card(small_ct, tmp_path):
    import torch
    from monai.networks.nets import UNet

    cfg = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1)
    ckpt = tmp_path / "unet.pth"
    torch.save({"state_dict": UNet(**cfg).state_dict()}, ckpt)
    out = tmp_path / "o.nii.gz"
    rc = main(["segment", str(small_ct), "--arch", "unet", "--num-labels", "2", "--checkpoint", str(ckpt),
               "-o", str(out), "--progress", "none", "--roi-size", "16", "16", "16"])
    assert rc == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert labels.shape == (12, 20, 24) and set(np.unique(labels)) <= {0, 1, 2}


def test_models_lists_builtin_cards_as_json():
    r = run_cli("models", "--json")
    assert r.returncode == 0
    cards = {c["id"]: c for c in json.loads(r.stdout)["models"]}
    assert "demo" in cards and cards["demo"]["demonstration"] is True
    assert cards["demo"]["inputs"][0]["name"] == "CT"
    assert len(cards["demo"]["labels"]) == 7


def test_models_shows_user_cards_and_reports_invalid_ones(tmp_path):
    make_card(tmp_path, "my-model")
    (tmp_path / "broken.json").write_text('{"id": "broken", "title": "x"}')
    r = run_cli("models", "--json", "--cards-dir", str(tmp_path))
    data = json.loads(r.stdout)
    assert "my-model" in {c["id"] for c in data["models"]}
    assert any("broken.json" in p for p in data["problems"])


def test_devices_json_says_why():
    r = run_cli("devices", "--json")
    data = json.loads(r.stdout)
    assert data["auto"] in {d["id"] for d in data["devices"]}
    assert data["reason"]
    assert any(d["id"] == "cpu" for d in data["devices"])


def test_inspect_names_the_architecture(tmp_path):
    import torch
    from monai.networks.nets import UNet

    path = tmp_path / "w.ckpt"
    cfg = dict(spatial_dims=3, in_channels=1, out_channels=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
    torch.save({"state_dict": {"model." + k: v for k, v in UNet(**cfg).state_dict().items()}, "epoch": 4}, path)
    r = run_cli("inspect", str(path), "--json")
    info = json.loads(r.stdout)
    assert info["wrapper"] == ["state_dict"]
    assert info["matches"][0]["architecture"] == "unet"
    assert info["matches"][0]["config"]["out_channels"] == 4
    text = run_cli("inspect", str(path)).stdout
    assert "fits unet" in text
    assert info["cards"] == [] and info["matches"][0]["not_in_weights"]["activation"].startswith("not in the weights")


def test_inspect_of_the_demo_weights_guesses_nothing(capsys):
    """The demo checkpoint: no assumed heads, no "sigmoid channels" (the card says softmax, heads
    [1, 2, 2, 4]); it says what the weights cannot show and which card was written for the file."""
    from volseg.cards import load_card

    card = load_card("demo")
    assert main(["inspect", str(card.checkpoint_path)]) == 0
    text = capsys.readouterr().out
    assert "(assumed)" not in text and "sigmoid channels" not in text and "8 output channels" in text
    assert "model card 'demo' was written for this file" in text
    assert "num_heads: not in the weights" in text and "activation: not in the weights: softmax or sigmoid" in text
    assert main(["inspect", str(card.checkpoint_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cards"] == ["demo"] and "num_heads" not in info["matches"][0]["config"]


def test_serve_keeps_working_between_requests(small_ct, threshold_card, threshold_torchscript, tmp_path):
    reqs = []
    for n in range(2):
        reqs.append({"id": n, "args": [str(small_ct), "--model", str(threshold_card), "--checkpoint",
                                       str(threshold_torchscript), "-o", str(tmp_path / f"r{n}.nii.gz")]})
    reqs.append({"id": 9, "args": ["--bogus"]})
    r = run_cli("serve", input="\n".join(json.dumps(q) for q in reqs) + "\n")
    assert r.returncode == 0
    ev = events(r.stdout)
    done = [e["request"] for e in ev if e["event"] == "done"]
    assert done == [0, 1]
    assert [e["request"] for e in ev if e["event"] == "error"] == [9]
    assert (tmp_path / "r0.nii.gz").exists() and (tmp_path / "r1.nii.gz").exists()


def test_dicom_series_in_dicom_seg_out(tmp_path, ct_path, threshold_torchscript, capsys):
    """A DICOM CT series folder through `volseg segment` to a DICOM SEG that references it."""
    import highdicom as hd
    import pydicom
    from test_io_dicom import _crop_grid, write_ct_series
    from volseg.io import read_volume

    series = tmp_path / "series"
    series.mkdir()
    write_ct_series(series, _crop_grid(read_volume(ct_path)))
    scale = {"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}
    card = make_card(tmp_path, "dcm", preprocessing=[scale], inference={"roi_size": [16, 16, 8]})
    out = tmp_path / "seg.dcm"
    rc = main(["segment", str(series), "--model", str(card), "--checkpoint", str(threshold_torchscript), "-o", str(out),
               "--progress", "none"])
    assert rc == 0, capsys.readouterr().err
    seg = hd.seg.segread(str(out))
    first = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "bright"
    assert seg.StudyInstanceUID == first.StudyInstanceUID


def test_nifti_input_cannot_become_dicom_seg_and_nothing_is_computed(small_ct, threshold_card, threshold_torchscript,
                                                                    tmp_path, capsys):
    rc = main(["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
               "-o", str(tmp_path / "x.dcm"), "--progress", "json"])
    assert rc == 2
    ev = events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "DICOM" in ev[-1]["message"]
    assert "infer" not in [e.get("stage") for e in ev]


def test_volume_too_large_for_memory_is_refused_up_front(small_ct, threshold_card, threshold_torchscript, tmp_path,
                                                         monkeypatch, capsys):
    import volseg.pipeline

    monkeypatch.setattr(volseg.pipeline, "_available_memory", lambda: 1000)  # bytes
    out = tmp_path / "o.nii.gz"
    rc = main(["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
               "-o", str(out), "--progress", "none"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "MiB of memory" in err and "are available" in err and "hint:" in err
    assert not out.exists()


def test_models_are_listed_before_torch_is_installed():
    """The Slicer panel lists models before PyTorch is installed: reading cards must not need torch."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
            "from volseg.cli.main import main; sys.exit(main(['models', '--json']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "demo" in {c["id"] for c in json.loads(r.stdout)["models"]}


def test_unexpected_failure_is_reported_without_traceback(small_ct, threshold_card, threshold_torchscript, tmp_path,
                                                          monkeypatch, capsys):
    import volseg.pipeline

    def broken(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(volseg.pipeline, "postprocess", broken)
    args = ["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
            "-o", str(tmp_path / "o.nrrd"), "--progress", "json"]
    assert main(args) == 1
    last = events(capsys.readouterr().out)[-1]
    assert last["event"] == "error" and "internal error (ZeroDivisionError: boom)" in last["message"]
    assert "VOLSEG_DEBUG" in last["hint"]
    assert not (tmp_path / "o.nrrd").exists()
    monkeypatch.setenv("VOLSEG_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(args)


def test_dicom_series_choice_reaches_the_json_stream(tmp_path, ct_path, threshold_torchscript, capsys):
    """A folder with two series: which one was used is a warning event the Slicer module shows."""
    from test_io_dicom import _crop_grid, write_ct_series
    from volseg.io import Volume, read_volume

    crop = _crop_grid(read_volume(ct_path))
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_ct_series(folder, crop)
    small = Volume(crop.array[:, :, :3].copy(), crop.spacing, crop.origin, crop.direction)
    write_ct_series(folder, small, prefix="SMALL")
    card = make_card(tmp_path, "dcm2", inference={"roi_size": [16, 16, 8]})
    assert main(["segment", str(folder), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(tmp_path / "o.nrrd"), "--progress", "json"]) == 0
    ev = events(capsys.readouterr().out)
    assert any(e["event"] == "log" and e["level"] == "warning" and "DICOM series" in e["message"] for e in ev)


def test_serve_survives_null_and_non_object_lines_and_keeps_stdout_json(small_ct, threshold_card,
                                                                          threshold_torchscript, tmp_path):
    """`null` is valid JSON but no request: it must not end the worker (it once was the EOF
    marker); `--help` or bad arguments must answer one error event, never text on stdout."""
    def req(n):
        return json.dumps({"id": n, "args": [str(small_ct), "--model", str(threshold_card), "--checkpoint",
                                             str(threshold_torchscript), "-o", str(tmp_path / f"r{n}.nii.gz")]})
    lines = [req(0), "null", "[1, 2]", "7", json.dumps({"id": "h", "args": ["--help"]}),
             json.dumps({"id": "m", "args": [str(small_ct)]}), req(1)]
    r = run_cli("serve", input="\n".join(lines) + "\n")
    assert r.returncode == 0
    ev = events(r.stdout)  # every stdout line is a JSON event (help text would fail here)
    assert [e["request"] for e in ev if e["event"] == "done"] == [0, 1]
    errors = [e for e in ev if e["event"] == "error"]
    assert len(errors) == 5 and all(e["exit_code"] == 2 for e in errors)
    assert [e["message"] for e in errors[:3]] == ["bad request null", "bad request [1, 2]", "bad request 7"]
    by_request = {e.get("request"): e for e in errors}
    assert "--roi-size" in by_request["h"]["hint"]  # the help text travels in the event
    assert "required: -o/--output" in by_request["m"]["message"]
    assert "usage:" not in r.stdout.replace('"usage:', "")  # no bare usage line printed
    assert (tmp_path / "r1.nii.gz").exists()


def test_serve_answers_every_hostile_line_with_one_error_and_goes_on(small_ct, threshold_card,
                                                                      threshold_torchscript, tmp_path):
    """Issue 18 (4): each of these lines killed the reader thread (later requests never answered,
    no exit at EOF) or, for a 5,000-deep --arch-config, the whole worker."""
    from volseg.cli.serve import MAX_LINE_BYTES

    good = {"id": "ok", "args": [str(small_ct), "--model", str(threshold_card), "--checkpoint",
                                 str(threshold_torchscript), "-o", str(tmp_path / "ok.nii.gz")]}
    deep_config = {"id": "cfg", "args": [str(small_ct), "--arch", "unet", "--num-labels", "1", "--arch-config",
                                         "[" * 5000 + "]" * 5000, "-o", str(tmp_path / "cfg.nii.gz")]}
    lines = [
        ("[" * 200_000 + "]" * 200_000).encode(),  # a 200,000-deep array
        ('{"id": "big", "args": [' + "7" * 5000 + "]}").encode(),  # an integer of 5,000 digits
        b'{"id": "bad-utf8", "args": ["\xff\xfe"]}',  # invalid UTF-8
        json.dumps(deep_config).encode(),
        b'{"id": "long", "args": ["' + b"x" * (MAX_LINE_BYTES + 10) + b'"]}',
        json.dumps({"id": "nested-arg", "args": [[["x"]]]}).encode(),
        json.dumps(good).encode(),
    ]
    proc = subprocess.run([sys.executable, "-m", "volseg", "serve"], input=b"\n".join(lines) + b"\n",
                          capture_output=True, timeout=120, env={**ENV, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]  # ended at EOF
    ev = events(proc.stdout.decode())
    errors = [e for e in ev if e["event"] == "error"]
    assert len(errors) == 6 and all(e["exit_code"] == 2 for e in errors)
    messages = [e["message"] for e in errors]
    assert "nested too deeply" in messages[0]
    assert messages[1].startswith("bad request {")
    assert messages[2].startswith("request line is not UTF-8 (byte 0xff")
    assert errors[3]["request"] == "cfg" and "--arch-config" in messages[3] and "nested too deeply" in messages[3]
    assert messages[4].startswith(f"request line longer than {MAX_LINE_BYTES:,} bytes")
    assert errors[5]["request"] == "nested-arg" and "must be a string or a number" in messages[5]
    assert [e["request"] for e in ev if e["event"] == "done"] == ["ok"]  # the valid request after them ran
    assert (tmp_path / "ok.nii.gz").exists()


def test_a_hostile_arch_config_is_an_argument_error(small_ct, tmp_path, capsys):
    for value, why in (("[" * 5000 + "]" * 5000, "JSON nested too deeply"), ("1" * 5000, "not valid JSON"),
                       ("[1, 2]", "not a JSON object")):
        with pytest.raises(SystemExit) as exited:  # argparse's own exit: usage and one line on stderr
            main(["segment", str(small_ct), "--arch", "unet", "--num-labels", "1", "--arch-config", value,
                  "-o", str(tmp_path / "o.nii.gz")])
        assert exited.value.code == 2
        assert f"argument --arch-config: {why}" in capsys.readouterr().err


class _LineFeed:
    """A stdin whose lines the test sends one at a time (``None`` closes it)."""

    def __init__(self) -> None:
        import queue
        self.lines = queue.Queue()

    def send(self, obj) -> None:
        self.lines.put(json.dumps(obj) + "\n")

    def __iter__(self):
        while (line := self.lines.get()) is not None:
            yield line


def test_serve_cancel_stops_only_the_request_it_names(small_ct, threshold_card, monkeypatch):
    import io
    import threading

    import volseg.pipeline
    from volseg.cli.serve import cmd_serve
    from volseg.errors import Cancelled

    started, ran = {}, []

    def fake_segment(request, reporter, cancel, cache=None):
        name = request.output.name
        ran.append(name)
        started.setdefault(name, threading.Event()).set()
        if name.startswith("slow"):
            if not cancel.wait(30):
                raise AssertionError("never cancelled")
            raise Cancelled()
        reporter.done({"segmentation": str(request.output)})

    monkeypatch.setattr(volseg.pipeline, "segment", fake_segment)
    for name in ("slowA", "slowD"):
        started[name] = threading.Event()

    def req(rid, out):
        return {"id": rid, "args": [str(small_ct), "--model", str(threshold_card), "-o", out]}

    feed, out = _LineFeed(), io.StringIO()
    worker = threading.Thread(target=cmd_serve, args=(None,), kwargs={"stdin": feed, "stdout": out})
    worker.start()
    try:
        for rid, name in (("A", "slowA"), ("B", "b"), (3, "c"), ("D", "slowD")):
            feed.send(req(rid, name))
        assert started["slowA"].wait(30)
        feed.send({"cancel": "B"})  # queued: skipped later; A keeps running
        feed.send({"cancel": "3"})  # "3" is not 3: changes nothing
        feed.send({"cancel": "nobody"})
        feed.send({"cancel": "A"})
        assert started["slowD"].wait(30)
        feed.send({"cancel": True})  # the Slicer module's older form: whatever runs now
    finally:
        feed.lines.put(None)
        worker.join(30)
    assert not worker.is_alive()
    assert ran == ["slowA", "c", "slowD"]
    ev = events(out.getvalue())
    outcome = {e["request"]: (e["event"], e.get("exit_code")) for e in ev if e["event"] in ("done", "error")}
    assert outcome == {"A": ("error", 130), "B": ("error", 130), 3: ("done", None), "D": ("error", 130)}


def test_cancel_line_of_the_slicer_module_is_understood():
    """The module sends cancel_request_line(id); the worker must read it as a cancel of that id."""
    from volseg.cli.serve import _EOF, _ServeQueue
    from VolSegSlicerLib.command import cancel_request_line

    q = _ServeQueue()
    q.put({"id": "job-1", "args": []})
    q.put({"id": "job-2", "args": []})
    assert q.next() == ({"id": "job-1", "args": []}, False)
    q.read(iter([cancel_request_line("job-2")]))  # then stdin ends
    assert not q.cancel_event.is_set()  # job-1 runs on
    assert q.next() == ({"id": "job-2", "args": []}, True)
    assert q.next() == (_EOF, False)
    q.finished()
    q.put({"id": "job-3", "args": []})
    assert q.next()[1] is False
    q.read(iter([cancel_request_line("job-3")]))
    assert q.cancel_event.is_set()


@pytest.mark.parametrize("option", [["--min-island-mm3", "nan"], ["--min-island-mm3", "inf"], ["--overlap", "nan"],
                                    ["--overlap=-inf"]])
def test_non_finite_numbers_are_refused(small_ct, threshold_card, threshold_torchscript, tmp_path, capsys, option):
    out = tmp_path / "res.seg.nrrd"
    rc = main(["segment", str(small_ct), "--model", str(threshold_card), "--checkpoint", str(threshold_torchscript),
               "-o", str(out), "--progress", "none", *option])
    assert rc == 2
    assert "not a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_listing_commands_report_a_bug_in_one_line(monkeypatch, capsys):
    import volseg.cli.main

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setitem(volseg.cli.main.COMMANDS, "devices", broken)
    assert main(["devices"]) == 1
    err = capsys.readouterr().err
    assert "internal error (KeyError" in err and "VOLSEG_DEBUG" in err


@pytest.mark.parametrize("code,ignored", [(0, True), (2, False)])
def test_a_finished_command_ignores_a_late_signal(code, ignored):
    """After `done` the process still exits for up to a second (PyTorch's teardown): a SIGINT
    there killed it (-2 / 130) although the result was written. The console script and
    `python -m volseg` ignore signals once a command has finished with 0, not after a failure."""
    import signal
    import subprocess
    import sys

    script = ("import signal, sys\n"
              "from volseg.cli import main as m\n"
              f"m.main = lambda argv=None: {code}\n"
              "try:\n    m.entry_point()\n"
              "except SystemExit as e:\n"
              "    print(e.code, signal.getsignal(signal.SIGINT) == signal.SIG_IGN,"
              " signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [str(code), str(ignored), str(ignored)], done.stderr


def test_a_huge_roi_size_is_a_bad_argument(ct_path, tmp_path):
    """--roi-size 100000^3 was reported as the volume needing 102 million GiB (exit 3, 'crop the
    volume'); the window is what is wrong: exit 2, said before any work."""
    r = run_cli("segment", str(ct_path), "--model", "demo", "-o", str(tmp_path / "o.seg.nrrd"),
                "--roi-size", "100000", "100000", "100000")
    assert r.returncode == 2
    assert "larger than any network window" in r.stderr and "GiB" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_an_empty_input_file_is_refused_before_the_imports(tmp_path):
    """A 0-byte input got ITK's 'Unable to determine ImageIO reader' after 4 s of imports."""
    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    r = run_cli("segment", str(empty), "--model", "demo", "-o", str(tmp_path / "o.seg.nrrd"))
    assert r.returncode == 2
    assert "is empty (0 bytes)" in r.stderr and "ImageIO" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nrrd"]
