"""`volseg batch`: many cases, one model load, failures isolated, nothing overwritten."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_card
from volseg.cli.main import main


def write_case(path, value=800.0, shape=(20, 16, 12)):
    a = np.zeros(shape[::-1], np.float32) - 1000
    a[2:6, 3:9, 4:12] = value
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.2, 2.0))
    sitk.WriteImage(img, str(path))
    return path


SCALE = [{"name": "ScaleIntensityRange", "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}]


def test_batch_of_files(tmp_path, threshold_torchscript, capsys):
    cases = [write_case(tmp_path / f"case{n}.nii.gz") for n in range(3)]
    (tmp_path / "broken.nrrd").write_text("not an image")
    out = tmp_path / "results"
    out.mkdir()
    (out / "case1.seg.nrrd").write_bytes(b"keep me")
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    rc = main(["batch", *map(str, cases), str(tmp_path / "broken.nrrd"), "--model", str(card),
               "--checkpoint", str(threshold_torchscript), "-o", str(out), "--progress", "json"])
    assert rc == 1  # one case failed
    ev = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(e["event"] == "done" for e in ev) == 2
    assert sum(e["event"] == "stage" and e["stage"] == "load_model" for e in ev) == 2
    errors = [e for e in ev if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["message"].startswith("broken:")
    assert (out / "case1.seg.nrrd").read_bytes() == b"keep me"
    assert (out / "case0.seg.nrrd").exists() and (out / "case2.seg.nrrd").exists()
    assert any(e["event"] == "log" and "1 skipped" in e["message"] for e in ev)


def test_batch_loads_the_model_once(tmp_path, threshold_torchscript, monkeypatch):
    import volseg.pipeline

    calls = []
    real = volseg.pipeline.load_model
    monkeypatch.setattr(volseg.pipeline, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [write_case(tmp_path / f"c{n}.nrrd") for n in range(3)]
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    assert main(["batch", *map(str, cases), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(tmp_path / "o"), "--format", ".nii.gz", "--progress", "none"]) == 0
    assert len(calls) == 1
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "c2.nii.gz")))
    assert labels.sum() == 4 * 6 * 8


def test_multi_input_case_folders_use_name_hints(tmp_path, threshold_torchscript, capsys):
    inputs = [{"name": "T1", "name_hint": "t1"}, {"name": "FLAIR", "name_hint": "flair"}]
    card = make_card(tmp_path, "two", inputs=inputs, preprocessing=SCALE)
    folder = tmp_path / "patient7"
    folder.mkdir()
    write_case(folder / "p7_flair.nii.gz", value=-1000)  # would give no label if taken for channel 0
    write_case(folder / "p7_t1.nii.gz")
    out = tmp_path / "o"
    assert main(["batch", str(folder), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--format", ".nrrd", "--progress", "none"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patient7.nrrd")))
    assert labels.sum() == 4 * 6 * 8  # channel 0 was the T1 file

    lonely = tmp_path / "case.nii.gz"
    write_case(lonely)
    assert main(["batch", str(lonely), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--progress", "none"]) == 2
    assert "needs 2 inputs" in capsys.readouterr().err


def test_unexpected_error_in_one_case_does_not_stop_the_others(tmp_path, threshold_torchscript, capsys, monkeypatch):
    import volseg.cohort.case_runner

    real = volseg.cohort.case_runner.segment

    def flaky(request, *a, **k):
        if request.inputs[0].name.startswith("b"):
            raise RuntimeError("boom inside the network")
        if request.inputs[0].name.startswith("c"):
            raise MemoryError()
        return real(request, *a, **k)

    monkeypatch.setattr(volseg.cohort.case_runner, "segment", flaky)
    cases = [write_case(tmp_path / f"{n}.nrrd") for n in ("a", "b", "c", "d")]
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    out = tmp_path / "o"
    rc = main(["batch", *map(str, cases), "--model", str(card), "--checkpoint", str(threshold_torchscript),
               "-o", str(out), "--progress", "json"])
    assert rc == 1
    ev = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = {e["message"].split(":")[0]: e for e in ev if e["event"] == "error"}
    assert set(errors) == {"b", "c"}
    assert "internal error (RuntimeError: boom inside the network)" in errors["b"]["message"]
    assert errors["b"]["exit_code"] == 1
    assert "out of memory" in errors["c"]["message"] and errors["c"]["exit_code"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "d.seg.nrrd", "volseg-manifest.jsonl"]


def test_folder_of_volumes_is_one_case_per_file_for_single_input_models(tmp_path, threshold_torchscript):
    folder = tmp_path / "cases"
    folder.mkdir()
    for n in (2, 0, 1):
        write_case(folder / f"p{n}.nii.gz")
    (folder / "notes.txt").write_text("not a volume")
    (folder / ".hidden.nrrd").write_text("not a volume either")
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    out = tmp_path / "o"
    assert main(["batch", str(folder), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--format", ".nii.gz", "--progress", "none"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    for n in range(3):
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"p{n}.nii.gz"))).sum() == 4 * 6 * 8


def test_find_cases_orders_folder_volumes_and_refuses_an_empty_folder(tmp_path):
    import pytest
    from volseg.cohort.batch import find_cases
    from volseg.cards import load_card
    from volseg.errors import InputError

    card = load_card(str(make_card(tmp_path, "thr")))
    folder = tmp_path / "vols"
    folder.mkdir()
    for name in ("b.nrrd", "a.mha", "c.nii"):
        (folder / name).write_bytes(b"x")
    cases = find_cases([folder], card)
    assert [(c.name, [p.name for p in c.inputs]) for c in cases] == [("a", ["a.mha"]), ("b", ["b.nrrd"]), ("c", ["c.nii"])]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no volume"):
        find_cases([empty], card)


def test_batch_help_explains_what_a_folder_becomes(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one case per volume file in it" in text and "multi-input model" in text


def test_output_folder_that_cannot_be_made_is_a_clear_error(tmp_path, threshold_torchscript, capsys):
    case = write_case(tmp_path / "c.nrrd")
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    for target, text in ((a_file, "is a file"), (a_file / "x", "cannot create output folder")):
        rc = main(["batch", str(case), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                   "-o", str(target), "--progress", "none"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert text in err and "internal error" not in err
    assert a_file.read_text() == "keep"


def test_dot_is_named_after_the_current_folder(tmp_path, threshold_torchscript, monkeypatch):
    inputs = [{"name": "T1", "name_hint": "t1"}, {"name": "FLAIR", "name_hint": "flair"}]
    card = make_card(tmp_path, "two", inputs=inputs, preprocessing=SCALE)
    folder = tmp_path / "patient9"
    folder.mkdir()
    write_case(folder / "p9_flair.nii.gz")
    write_case(folder / "p9_t1.nii.gz")
    out = tmp_path / "o"
    monkeypatch.chdir(folder)
    assert main(["batch", ".", "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(out), "--format", ".nrrd", "--progress", "none"]) == 0
    assert [p.name for p in out.glob("*.nrrd")] == ["patient9.nrrd"]


def test_names_differing_only_in_case_clash(tmp_path, threshold_torchscript, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    cases = [write_case(tmp_path / "x" / "Case1.nrrd"), write_case(tmp_path / "y" / "case1.nii.gz")]
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    out = tmp_path / "o"
    rc = main(["batch", *map(str, cases), "--model", str(card), "--checkpoint", str(threshold_torchscript),
               "-o", str(out), "--progress", "none"])
    assert rc == 2
    assert "Case1/case1" in capsys.readouterr().err
    assert not out.exists()


def test_each_case_reports_its_own_time(tmp_path, threshold_torchscript, capsys, monkeypatch):
    """Equal cases take equal times: the done events do not add up the cases before them."""
    import time

    import volseg.pipeline

    real = volseg.pipeline.predict_with_fallback

    def slow(*a, **k):
        time.sleep(0.4)
        return real(*a, **k)

    monkeypatch.setattr(volseg.pipeline, "predict_with_fallback", slow)
    cases = [write_case(tmp_path / f"c{n}.nrrd") for n in range(3)]
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    assert main(["batch", *map(str, cases), "--model", str(card), "--checkpoint", str(threshold_torchscript),
                 "-o", str(tmp_path / "o"), "--progress", "json"]) == 0
    done = [e for e in map(json.loads, capsys.readouterr().out.splitlines()) if e["event"] == "done"]
    assert len(done) == 3
    for event in done:  # accumulated, the third case would show >= 1.2 s of inference
        assert 0.4 <= event["timings"]["infer"] < 0.8, event["timings"]
        assert event["elapsed_s"] < 0.8 + sum(event["timings"].values()), event
        assert event["elapsed_s"] == pytest.approx(event["startup_s"] + sum(event["timings"].values()), abs=0.05)


def test_batch_help_has_no_probabilities(capsys):
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    assert "--probabilities" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # and the option is refused as an unknown one, not half-accepted
        main(["batch", "x.nrrd", "--model", "demo", "-o", "out", "--probabilities", "p.nii.gz"])
    assert "unrecognized arguments: --probabilities" in capsys.readouterr().err


def _batch(tmp_path, card, ckpt, *paths, progress="bar", out="o"):
    return main(["batch", *map(str, paths), "--model", str(card), "--checkpoint", str(ckpt),
                 "-o", str(tmp_path / out), "--progress", progress])


def test_text_output_of_a_resumed_batch_in_a_log(tmp_path, threshold_torchscript, capsys):
    """Not a terminal (a log file): each case's lines are kept; a failure is printed once; case
    numbers count the skipped cases as the bar does; the summary is the last line."""
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    first = write_case(tmp_path / "a.nrrd")
    assert _batch(tmp_path, card, threshold_torchscript, first, progress="none") == 0
    capsys.readouterr()
    broken = tmp_path / "b.nrrd"
    broken.write_text("not an image")
    rc = _batch(tmp_path, card, threshold_torchscript, first, broken, write_case(tmp_path / "c.nrrd"))
    assert rc == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert sum("cannot read" in line for line in lines) == 1, err  # the error once, with its hint
    failed = next(n for n, line in enumerate(lines) if "cannot read" in line)
    assert lines[failed].startswith("error: b: ") and lines[failed + 1].startswith("  hint: ")
    assert "case 2/3: b" in lines and "case 3/3: c" in lines and not any("/2: " in line for line in lines), err
    assert any(line.startswith("[") and "3/3 cases, 1 failed, 1 skipped" in line for line in lines), err
    assert any(line.startswith("reading 1 input(s)") for line in lines)  # the cases' own lines are kept
    assert lines[-1].startswith("batch: 1 done, 1 skipped, 1 failed; manifest ")


def test_progress_none_and_an_all_skipped_resume_end_with_a_summary(tmp_path, threshold_torchscript, capsys):
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    cases = [write_case(tmp_path / f"c{n}.nrrd") for n in range(2)]
    assert _batch(tmp_path, card, threshold_torchscript, *cases, progress="none") == 0
    assert capsys.readouterr().err.splitlines()[-1].startswith("batch: 2 done, 0 skipped, 0 failed; manifest ")
    for progress in ("none", "bar"):  # nothing left to do: still one line that says so
        assert _batch(tmp_path, card, threshold_torchscript, *cases, progress=progress) == 0
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("batch: 0 done, 2 skipped, 0 failed; manifest "), err
        if progress == "none":
            assert len(err.splitlines()) == 1, err


class _Terminal:
    """A stderr that says it is a terminal, keeping what is written."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_on_a_terminal_each_case_is_folded_under_the_cohort_bar(tmp_path, threshold_torchscript, monkeypatch):
    import sys

    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    broken = tmp_path / "b.nrrd"
    broken.write_text("not an image")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    rc = _batch(tmp_path, card, threshold_torchscript, write_case(tmp_path / "a.nrrd"), broken,
                write_case(tmp_path / "c.nrrd"))
    assert rc == 1
    text = terminal.buffer.getvalue()
    lines = text.split("\n")
    # the cases' stage lines are not lines of their own: they are redrawn in the bar's line
    assert not any(line.startswith(("reading 1 input", "wrote ", "case 1/3")) for line in lines), text
    assert "| case 1/3 a: reading 1 input(s)" in text and "| case 3/3 c: writing" in text
    assert sum("cannot read" in line for line in lines) == 1
    error = next(line for line in lines if "cannot read" in line)
    assert error.startswith("error: b: ")  # on a line of its own, not glued to the bar
    bar = [line for line in lines if "3/3 cases" in line][-1]
    assert bar.split("\r")[-1].startswith("[########################] 3/3 cases, 1 failed")
    assert lines[-2].startswith("batch: 2 done, 0 skipped, 1 failed") and lines[-1] == ""


def test_a_warning_every_case_gives_is_shown_once_on_a_terminal(tmp_path, threshold_torchscript, monkeypatch):
    import sys

    card = make_card(tmp_path, "thr", preprocessing=SCALE, demonstration=True)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _batch(tmp_path, card, threshold_torchscript, *[write_case(tmp_path / f"c{n}.nrrd") for n in range(3)]) == 0
    assert terminal.buffer.getvalue().count("is a demonstration model") == 1


def test_the_rate_counts_neither_skipped_cases_nor_their_time(monkeypatch):
    import io

    from volseg.cohort import progress as cohort_progress
    from volseg.progress import JsonReporter

    clock = [100.0]
    monkeypatch.setattr(cohort_progress.time, "perf_counter", lambda: clock[0])
    bar = cohort_progress.CohortProgress(JsonReporter(io.StringIO()), total=5)
    clock[0] += 30  # planning: hashing the inputs of the cases done before
    for name in ("a", "b", "c"):
        bar.case(name, "skipped")
    assert bar.snapshot()["cases_per_min"] is None and bar.number == 4
    bar.begin_case()
    clock[0] += 60
    bar.case("d", "done")
    snap = bar.snapshot()
    assert snap["cases_per_min"] == 1.0 and snap["eta_s"] == 60.0  # one case a minute, one left
    assert snap["elapsed_s"] == 90.0
