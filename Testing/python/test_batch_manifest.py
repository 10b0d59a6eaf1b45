"""The batch manifest and what a re-run does with it; cohort progress; the --cluster options
that need no Ray (Ray itself: test_cluster.py)."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import torch
from conftest import ThresholdNet, make_card
from test_batch import SCALE, write_case
from volseg.cli.main import main
from volseg.cohort.manifest import MANIFEST_NAME, Manifest, read_rows


@pytest.fixture
def cohort(tmp_path, threshold_torchscript):
    cases = tmp_path / "cases"
    cases.mkdir()
    for n in range(3):
        write_case(cases / f"c{n}.nii.gz", value=300.0 + 200 * n)
    card = make_card(tmp_path, "thr", preprocessing=SCALE)
    out = tmp_path / "out"

    def run(*extra, checkpoint=threshold_torchscript, progress="json"):
        return main(["batch", str(cases), "--model", str(card), "--checkpoint", str(checkpoint), "-o", str(out),
                     "--progress", progress, *extra])

    return {"run": run, "cases": cases, "out": out, "card": card}


def case_events(capsys):
    ev = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {e["case"]: e for e in ev if e["event"] == "case"}, ev


def mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != MANIFEST_NAME}


def test_rerun_skips_what_is_done_and_redoes_what_changed(cohort, capsys, tmp_path, threshold_torchscript):
    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    cases, ev = case_events(capsys)
    assert {c: e["status"] for c, e in cases.items()} == {"c0": "done", "c1": "done", "c2": "done"}
    assert cases["c2"]["cohort"] == {**cases["c2"]["cohort"], "done": 3, "failed": 0, "skipped": 0, "total": 3}
    rows, _ = read_rows(out / MANIFEST_NAME)
    for row in rows.values():  # per-case figures, not accumulated over the cohort
        assert row["status"] == "done" and row["attempts"] == 1 and row["device"] == "cpu" and row["error"] is None
        assert [o["name"] for o in row["outputs"]] == [f"{row['case']}.seg.nrrd"]
        # each stage and the total are rounded to 1 ms: the sum may exceed the total by half a ms a term
        assert 0 < sum(row["timings"].values()) <= row["elapsed_s"] + 5e-4 * (len(row["timings"]) + 1) + 1e-9
        assert row["cpu_s"] > 0
    first = mtimes(out)

    assert run() == 0  # same everything: nothing runs, no model is loaded
    cases, ev = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"skipped"}
    assert not any(e["event"] == "stage" for e in ev)
    assert mtimes(out) == first

    write_case(cohort["cases"] / "c1.nii.gz", value=900.0)  # a changed input: that case only
    assert run() == 0
    cases, _ = case_events(capsys)
    assert {c: e["status"] for c, e in cases.items()} == {"c0": "skipped", "c1": "done", "c2": "skipped"}

    assert run("--min-island-mm3", "2") == 0  # a changed option: every case
    cases, ev = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"done"}
    assert any(e["event"] == "log" and "made with other options; redoing it" in e["message"] for e in ev)

    other = tmp_path / "other.pt"  # other weights (another SHA-256): every case
    torch.jit.save(torch.jit.script(ThresholdNet(0.51)), str(other))
    assert run("--min-island-mm3", "2", checkpoint=other) == 0
    cases, _ = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"done"}
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert len({r["made_with"]["checkpoint_sha256"] for r in rows.values()}) == 1

    assert run("--min-island-mm3", "2", "--overwrite", checkpoint=other) == 0  # --overwrite redoes them all
    cases, _ = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"done"}
    assert (out / MANIFEST_NAME).read_text().count("\n") == 3  # one row per case once the run ended


def test_a_result_changed_by_hand_is_never_replaced_without_overwrite(cohort, capsys):
    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    (out / "c1.seg.nrrd").write_bytes(b"edited by hand")
    assert run("--overlap", "0.5") == 0
    cases, _ = case_events(capsys)
    assert {c: e["status"] for c, e in cases.items()} == {"c0": "done", "c1": "skipped", "c2": "done"}
    assert "not written by volseg batch" in cases["c1"]["message"]
    assert (out / "c1.seg.nrrd").read_bytes() == b"edited by hand"
    assert read_rows(out / MANIFEST_NAME)[0]["c1"]["status"] == "skipped"


def test_cancel_in_a_plain_batch(cohort, threshold_torchscript):
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

    out = cohort["out"]
    args = build_parser().parse_args(["batch", str(cohort["cases"]), "--model", str(cohort["card"]),
                                      "--checkpoint", str(threshold_torchscript), "-o", str(out)])
    with pytest.raises(Cancelled, match=r"1 case\(s\) done, 0 failed, 2 not done") as caught:
        run_batch(request_from_args(args), [cohort["cases"]], out, ".seg.nrrd", CancelAfterFirstCase(), cancel)
    assert "run the same command again" in caught.value.hint
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert {c: r["status"] for c, r in rows.items()} == {"c0": "done", "c1": "not_done", "c2": "not_done"}
    assert rows["c1"]["error"]["message"] == "cancelled before it ran"
    assert sorted(p.name for p in out.iterdir()) == ["c0.seg.nrrd", MANIFEST_NAME]


def test_broken_manifest_lines_are_ignored_and_dropped(cohort, capsys):
    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    with open(out / MANIFEST_NAME, "a") as f:
        f.write('{"case": "c1", "status": "do')  # a run killed while writing
    assert run() == 0
    cases, ev = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"skipped"}
    assert any(e["event"] == "log" and "1 unreadable line(s)" in e["message"] for e in ev)
    assert read_rows(out / MANIFEST_NAME)[1] == 0


def test_a_second_batch_into_the_same_folder_is_refused(cohort, capsys):
    out = cohort["out"]
    out.mkdir()
    with Manifest(out):
        assert cohort["run"](progress="none") == 2
    assert "another volseg batch is writing into" in capsys.readouterr().err
    assert not list(out.glob("*.seg.nrrd"))


def test_plain_batch_never_imports_ray_and_cluster_says_how_to_get_it(cohort, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    assert cohort["run"](progress="none") == 0
    capsys.readouterr()
    for f in cohort["out"].glob("*.seg.nrrd"):
        f.unlink()
    assert cohort["run"]("--cluster", "local", progress="none") == 3
    err = capsys.readouterr().err
    assert "--cluster needs Ray, which is not installed" in err and 'pip install "volseg[cluster]"' in err
    assert "Traceback" not in err
    assert read_rows(cohort["out"] / MANIFEST_NAME)[0]["c0"]["status"] == "done"  # refused before any work


@pytest.mark.parametrize(("extra", "text"), [
    (["--cluster", "somewhere"], "is not local, auto or ray://HOST:PORT"),
    (["--workers", "2"], "--workers is for --cluster runs"),
    (["--cluster", "local", "--workers", "0"], "--workers 0 must be at least 1"),
    (["--cluster", "local", "--retries", "-1"], "--retries -1 must be 0 or more"),
])
def test_cluster_options_are_checked_before_anything_runs(cohort, capsys, extra, text):
    assert cohort["run"](*extra, progress="none") == 2
    assert text in capsys.readouterr().err
    assert not cohort["out"].exists()


def test_pool_shape():
    from volseg.cohort.cluster import pool_shape
    from volseg.errors import InputError, ResourceError

    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 4}, {"CPU": 32, "GPU": 4}]
    s = pool_shape(gpu_nodes, "auto", None)
    assert (s.workers, s.num_gpus, s.num_cpus, s.device) == (6, 1, 8, "cuda")
    s = pool_shape(gpu_nodes, "cpu", None)  # CPU actors of 4 threads: 4 + 1 + 8
    assert (s.workers, s.num_gpus, s.threads, s.device) == (13, 0, 4, "cpu")
    s = pool_shape([{"CPU": 2}], "auto", 2)
    assert (s.workers, s.threads, s.num_cpus, s.device) == (2, 1, 1, "cpu")
    s = pool_shape([{"CPU": 2}], "auto", None)
    assert (s.workers, s.threads) == (1, 2)
    with pytest.raises(ResourceError, match="no GPU"):
        pool_shape([{"CPU": 2}], "cuda", None)
    with pytest.raises(InputError, match="gets a GPU of its own"):
        pool_shape(gpu_nodes, "cuda:1", None)


def test_partial_outputs_of_a_dead_worker_are_removed_and_no_others(tmp_path):
    from volseg.cohort.case_runner import Job, discard_partial_outputs

    ours = tmp_path / ".volseg-stage-abc"
    ours.mkdir()
    (ours / "p1.nii.gz").write_bytes(b"half")
    (ours / ".p1.volseg-tmp-0123456789ab.csv").write_bytes(b"half")
    other = tmp_path / ".volseg-stage-def"
    other.mkdir()
    (other / "p10.nii.gz").write_bytes(b"another case, still being written")
    (tmp_path / "p1.nii.gz").write_bytes(b"moved into place, its colour table not yet")
    job = Job("p1", [], tmp_path / "p1.nii.gz", fresh=True)
    assert sorted(p.name for p in discard_partial_outputs(job)) == [".volseg-stage-abc", "p1.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".volseg-stage-def"]
    (tmp_path / "p1.nii.gz").write_bytes(b"an earlier result")  # not fresh: an earlier result stays
    assert discard_partial_outputs(Job("p1", [], tmp_path / "p1.nii.gz", fresh=False)) == []


def test_cohort_bar_line():
    from volseg.cohort.progress import bar_line

    line = bar_line({"done": 9, "failed": 1, "skipped": 2, "total": 24, "cases_per_min": 4.25, "eta_s": 169.0},
                    width=12)
    assert line.strip() == "[######......] 12/24 cases, 1 failed, 2 skipped, 4.2/min, 2m49s left"
    assert bar_line({"done": 0, "failed": 0, "skipped": 0, "total": 3, "cases_per_min": None,
                     "eta_s": None}).startswith("[........................] 0/3 cases")


def test_text_progress_shows_the_cohort(cohort, capsys):
    assert cohort["run"](progress="bar") == 0
    err = capsys.readouterr().err
    assert "3/3 cases" in err and "/min" in err
    assert cohort["run"](progress="none") == 0  # everything done before: only the summary says so
    assert capsys.readouterr().err.startswith("batch: 0 done, 3 skipped, 0 failed; manifest ")


def test_cases_left_when_the_cluster_fails_say_why(cohort, monkeypatch, capsys):
    import volseg.cohort.cluster
    from volseg.errors import ResourceError

    def unreachable(*args, **kwargs):
        raise ResourceError("cannot join the Ray cluster at ray://nowhere:10001: refused")

    monkeypatch.setattr(volseg.cohort.cluster, "require_ray", lambda: None)
    monkeypatch.setattr(volseg.cohort.cluster, "run_on_cluster", unreachable)
    assert cohort["run"]("--cluster", "ray://nowhere:10001", progress="none") == 3
    assert "cannot join the Ray cluster" in capsys.readouterr().err
    rows, _ = read_rows(cohort["out"] / MANIFEST_NAME)
    assert {r["status"] for r in rows.values()} == {"not_done"}
    assert rows["c0"]["error"]["message"] == "not run: the batch stopped (cannot join the Ray cluster at " \
        "ray://nowhere:10001: refused)"


# -- issue 18 (2, 7, 9): the manifest is someone else's file until checked ----------------------
def test_a_manifest_symlink_is_never_followed(cohort, capsys, tmp_path):
    """`out/volseg-manifest.jsonl -> ~/.bashrc`: today every case appends a row (with the input's
    name, e.g. `x$(touch PWNED)y`) to the shell's start-up file."""
    out = cohort["out"]
    out.mkdir()
    bashrc = tmp_path / "bashrc"
    bashrc.write_text("export PS1='$ '\n")
    (out / MANIFEST_NAME).symlink_to(bashrc)
    assert cohort["run"]() == 2
    _, ev = case_events(capsys)
    error = [e for e in ev if e["event"] == "error"][-1]
    assert "is a symbolic link" in error["message"] and str(out / MANIFEST_NAME) in error["message"]
    assert bashrc.read_text() == "export PS1='$ '\n"  # untouched
    assert not list(out.glob("*.seg.nrrd"))  # refused before anything ran


def test_a_fifo_manifest_is_refused_at_once(cohort, capsys):
    import os

    out = cohort["out"]
    out.mkdir()
    os.mkfifo(out / MANIFEST_NAME)  # today: the batch blocks for ever reading it
    assert cohort["run"]() == 2
    _, ev = case_events(capsys)
    assert "is a FIFO (named pipe), not a regular file" in [e for e in ev if e["event"] == "error"][-1]["message"]


def test_a_manifest_of_another_user_is_refused(cohort, capsys):
    import os

    if os.geteuid() != 0:
        pytest.skip("making a file of another user needs root")
    out = cohort["out"]
    out.mkdir()
    (out / MANIFEST_NAME).write_text("")
    os.chown(out / MANIFEST_NAME, 65534, 65534)
    assert cohort["run"]() == 2
    _, ev = case_events(capsys)
    assert "belongs to another user" in [e for e in ev if e["event"] == "error"][-1]["message"]


def _forge(out, case, **fields):
    """Rewrite ``case``'s row of the manifest with ``fields`` (what someone else could write)."""
    rows, _ = read_rows(out / MANIFEST_NAME)
    rows[case].update(fields)
    (out / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows.values()))


def test_a_forged_row_cannot_make_a_rerun_skip_replaced_content(cohort, capsys):
    """A result replaced by other content of the same size and modification time is not the
    result volseg wrote: today the row's size and mtime match and the case is skipped as done."""
    import os

    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    result = out / "c1.seg.nrrd"
    st = result.stat()
    result.write_bytes(b"X" * st.st_size)
    os.utime(result, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run() == 0
    cases, _ = case_events(capsys)
    assert cases["c1"]["status"] == "skipped" and "not written by volseg batch" in cases["c1"]["message"]
    assert cases["c0"]["status"] == "skipped" and "not written" not in cases["c0"]["message"]
    assert result.read_bytes() == b"X" * st.st_size
    rows, _ = read_rows(out / MANIFEST_NAME)
    assert rows["c1"]["outputs"] == [] and rows["c1"]["error"]["message"].startswith("c1.seg.nrrd exists")
    assert len(rows["c0"]["outputs"][0]["sha256"]) == 64


def test_a_forged_row_cannot_make_a_rerun_replace_a_hand_corrected_file(cohort, capsys):
    """The row claims the hand-corrected file (its size and time copied) is volseg's, made with
    other settings: today a re-run "redoes" it and replaces it without --overwrite."""
    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    result = out / "c2.seg.nrrd"
    result.write_bytes(b"corrected by hand")
    st = result.stat()
    rows, _ = read_rows(out / MANIFEST_NAME)
    _forge(out, "c2", outputs=[{**rows["c2"]["outputs"][0], "size": st.st_size, "mtime_ns": st.st_mtime_ns}],
           made_with={**rows["c2"]["made_with"], "options": {}})
    assert run() == 0
    cases, _ = case_events(capsys)
    assert cases["c2"]["status"] == "skipped" and "pass --overwrite" in cases["c2"]["message"]
    assert result.read_bytes() == b"corrected by hand"


@pytest.mark.parametrize("bad", [
    '{"case": "c0", "outputs": 5, "made_with": {}}',
    '{"case": "c0", "outputs": [[["c0.seg.nrrd"]]], "made_with": {}}',
    '{"case": "c0", "outputs": [{"name": "c0.seg.nrrd", "size": 1' + "0" * 5000 + ', "mtime_ns": 1}]}',
    '{"case": "c0", "made_with": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"case": "c0", "outputs": [{"name": 7, "size": 1, "mtime_ns": 1}], "made_with": {}}',
    '{"case": "c0", "outputs": [], "made_with": "x"}',
], ids=["outputs-number", "nested-lists", "5000-digits", "deep-nesting", "name-number", "made_with-string"])
def test_malformed_manifest_rows_are_ignored_not_fatal(cohort, capsys, bad):
    run, out = cohort["run"], cohort["out"]
    assert run() == 0
    with open(out / MANIFEST_NAME, "a") as f:
        f.write(bad + "\n")
    assert run() == 0  # today: an internal error (exit 1) and nothing done
    cases, ev = case_events(capsys)
    assert {e["status"] for e in cases.values()} == {"skipped"}  # the earlier row of c0 still counts
    assert any(e["event"] == "log" and "1 unreadable line(s)" in e["message"] for e in ev)
