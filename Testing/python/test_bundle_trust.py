"""Trusting a MONAI bundle's own code: the engine's list of that code (``volseg bundle-code``), the
bundle digest that binds a decision, and the panel's library (VolSegSlicerLib.bundle_trust): the
question shows the engine's list, only an explicit Trust adds ``--trust-bundle-code``, an edited
bundle is asked about again, a link is refused."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from test_bundles import BUNDLES, copy_bundle  # noqa: E402
from VolSegSlicerLib import bundle_trust  # noqa: E402
from VolSegSlicerLib.bundle_trust import (NeedsTrust, TrustStore, parse_code_report, run_arguments,  # noqa: E402
                                          trust_decision, trust_question)
from VolSegSlicerLib.command import SegmentOptions, segment_args, serve_request_line  # noqa: E402
from volseg.bundles.source import BundleError, bundle_digest, open_bundle  # noqa: E402
from volseg.bundles.trust import code_report  # noqa: E402
from volseg.cli.main import main  # noqa: E402

RENAL = "renalStructures_UNEST_segmentation"


@pytest.fixture(scope="module")
def bundles() -> Path:
    if not BUNDLES.is_dir():
        pytest.skip("../shared/monai-bundles is not beside this checkout")
    return BUNDLES


class Settings(dict):
    """The module's application settings as the library sees them (value / setValue), counting writes."""

    writes = 0

    def value(self, key, default=None):
        return self.get(key, default)

    def set_value(self, key, value):
        self.writes += 1
        self[key] = value


def engine_report(path: Path, capsys) -> str:
    assert main(["bundle-code", str(path), "--json"]) == 0
    return capsys.readouterr().out


def model_of(path: Path) -> dict:
    return {"id": "b", "card_path": str(path), "bundle": {"path": str(path), "weights": "present"}}


def pixdim_expression_bundle(bundles: Path, tmp_path: Path) -> Path:
    """The spleen bundle with its Spacingd pixdim computed by a Python expression (needs trust)."""
    bundle = copy_bundle(bundles, "spleen_ct_segmentation", tmp_path)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["preprocessing"]["transforms"][3]["pixdim"] = "@pixdim"
    config["pixdim"] = "$[1.5 * 2, 1.5, 2.0]"
    path.write_text(json.dumps(config))
    return bundle


# -- the engine -------------------------------------------------------------------------------
def test_the_engine_lists_the_code_a_trusted_run_would_run_without_running_any(bundles, tmp_path, capsys) -> None:
    renal = copy_bundle(bundles, RENAL, tmp_path)
    report = json.loads(engine_report(renal, capsys))
    assert report["needs_trust"] is True and report["digest"] == bundle_digest(open_bundle(renal))
    assert "(Python code under scripts/)" in report["refusal"]
    code = report["code"]
    assert "network_def#_target_: scripts.networks.unest.UNesT (built by MONAI's bundle parser)" in code
    assert any(c.startswith("importable: ") and "scripts/networks/unest.py" in c for c in code)
    assert "imports#0: $import glob" in code  # MONAI runs every import statement once it evaluates anything
    assert not any(k == "scripts" or k.startswith("scripts.") for k in sys.modules)  # nothing imported
    # what a trusted run then announces (before running it) is all in that list
    from volseg.bundles.translate import bundle_card

    said: list[str] = []
    bundle_card(renal, trust=True, announce=said.extend)
    assert said and set(said) <= set(code)
    # a bundle that needs no code: nothing to trust
    spleen = json.loads(engine_report(bundles / "spleen_ct_segmentation", capsys))
    assert spleen["needs_trust"] is False and spleen["code"] == [] and spleen["digest"].startswith("sha256:")


@pytest.mark.parametrize("name", ["pancreas_ct_dints_segmentation", "multi_organ_segmentation", RENAL])
def test_for_every_bundle_needing_trust_what_the_trusted_run_announces_was_listed(bundles, name) -> None:
    """The property the panel's question rests on, over the shared bundles that need trust."""
    from volseg.bundles.translate import translate

    report = code_report(bundles / name)
    assert report["needs_trust"], report["refusal"]
    said: list[str] = []
    try:
        translate(open_bundle(bundles / name), trust=True, announce=said.extend)
    except BundleError:  # a bundle refused later, after some of its code ran: that code was listed too
        pass
    assert said and set(said) <= set(report["code"]), set(said) - set(report["code"])


@pytest.mark.parametrize("name", ["prostate_mri_anatomy", "ventricular_short_axis_3label"])
def test_a_bundle_refused_for_another_reason_is_refused_as_before_not_asked_about(bundles, name, capsys) -> None:
    from volseg.bundles.translate import translate

    with pytest.raises(BundleError) as before:
        translate(open_bundle(bundles / name))
    assert main(["bundle-code", str(bundles / name), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and before.value.message in captured.err  # the same message, no question


def test_an_expression_needing_trust_is_listed_and_is_what_the_trusted_run_evaluates(bundles, tmp_path) -> None:
    from volseg.bundles.translate import translate

    bundle = pixdim_expression_bundle(bundles, tmp_path)
    report = code_report(bundle)
    assert report["needs_trust"] and "pixdim: $[1.5 * 2, 1.5, 2.0]" in report["code"]
    assert "'pixdim' is Python code" in report["refusal"]
    said: list[str] = []
    translate(open_bundle(bundle), trust=True, announce=said.extend)
    assert said == ["pixdim: $[1.5 * 2, 1.5, 2.0]"] and set(said) <= set(report["code"])


def test_the_digest_follows_configs_and_scripts_and_refuses_links(bundles, tmp_path) -> None:
    renal = copy_bundle(bundles, RENAL, tmp_path)
    before = bundle_digest(open_bundle(renal))
    (renal / "docs" / "README.md").write_text("edited docs do not change what runs\n")
    assert bundle_digest(open_bundle(renal)) == before
    script = renal / "scripts" / "networks" / "unest.py"
    script.write_text(script.read_text() + "\n# edited\n")
    assert bundle_digest(open_bundle(renal)) != before
    os.symlink("/etc/passwd", renal / "scripts" / "planted.py")
    with pytest.raises(BundleError, match="not a regular file"):
        bundle_digest(open_bundle(renal))


def test_a_run_with_a_digest_refuses_a_bundle_edited_since(bundles, tmp_path, capsys) -> None:
    renal = copy_bundle(bundles, RENAL, tmp_path)
    digest = bundle_digest(open_bundle(renal))
    script = renal / "scripts" / "networks" / "unest.py"
    script.write_text(script.read_text() + "\nraise SystemExit('this must never run')\n")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--bundle", str(renal), "--trust-bundle-code",
                 "--bundle-sha256", digest, "-o", str(tmp_path / "out.nii.gz"), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "has changed since it was trusted" in err and "Traceback" not in err
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--bundle", str(renal), "--bundle-sha256", digest,
                 "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert "--bundle-sha256 goes with --bundle and --trust-bundle-code" in capsys.readouterr().err


def test_a_link_or_hostile_bundle_is_refused_before_any_question(bundles, tmp_path, capsys) -> None:
    link = tmp_path / "renal-link"
    link.symlink_to(bundles / RENAL)
    assert main(["bundle-code", str(link), "--json"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    with pytest.raises(BundleError, match="symbolic link"):
        trust_decision(model_of(link), TrustStore(Settings().value, Settings().set_value))
    from test_startup import probe

    missing, linked = probe(["bundle-code", str(tmp_path / "nothing-here"), "--json"], ["bundle-code", str(link), "--json"])
    assert missing["rc"] == 2 and "does not exist" in missing["err"] and missing["heavy"] == []
    assert linked["rc"] == 2 and "symbolic link" in linked["err"] and linked["heavy"] == []  # refused before torch
    import zipfile

    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../../evil.py", "x")
    assert main(["bundle-code", str(slip), "--json"]) == 2
    assert "outside the bundle" in capsys.readouterr().err


# -- the panel's library ------------------------------------------------------------------------
def test_the_question_shows_the_engines_list_and_only_trust_adds_the_flag(bundles, tmp_path, capsys) -> None:
    renal = copy_bundle(bundles, RENAL, tmp_path)
    text = engine_report(renal, capsys)
    report = parse_code_report(text)
    assert list(report.code) == json.loads(text)["code"]
    question = trust_question(report)
    lines = question.splitlines()
    assert lines[0] == "This bundle runs its own Python code:" and lines[-1] == "Run it only if you trust its source."
    assert [line.strip() for line in lines[2:-2]] == list(report.code)

    settings = Settings()
    store = TrustStore(settings.value, settings.set_value)
    model = model_of(renal)
    first = trust_decision(model, store)
    assert first.action == "ask" and first.path == str(renal)  # never asked: the engine is asked first
    with pytest.raises(NeedsTrust):
        run_arguments(first)

    assert bundle_trust.list_title("Renal", model, store) == "Renal"  # not asked yet: runs are refused anyway
    store.record(report, trusted=False)  # Cancel
    assert store.needs_trust_label(model) == "needs trust"
    assert bundle_trust.list_title("Renal", model, store) == "Renal (needs trust)"
    refused = trust_decision(model, store)
    assert refused.action == "ask" and "did not trust" in refused.reason
    with pytest.raises(NeedsTrust, match="nothing was started"):
        run_arguments(refused)
    args = segment_args(SegmentOptions(model=str(renal), inputs=["in.nrrd"], output="out.nrrd"))
    assert "--trust-bundle-code" not in args and args[2:4] == ["--model", str(renal)]

    store.record(report, trusted=True)  # Trust
    assert settings.writes == 2 and json.loads(settings[bundle_trust.SETTINGS_KEY])  # one value, written whole
    assert store.needs_trust_label(model) == "" and bundle_trust.list_title("Renal", model, store) == "Renal"
    decision = trust_decision(model, TrustStore(settings.value, settings.set_value))  # remembered
    assert decision.action == "run" and decision.digest == report.digest
    options = SegmentOptions(model=str(renal), inputs=["in.nrrd"], output="out.nrrd", **run_arguments(decision))
    args = segment_args(options)
    assert args[2:8] == ["--bundle", str(renal), "--trust-bundle-code", "--bundle-sha256", report.digest, "-o"]
    assert "--model" not in args
    assert json.loads(serve_request_line("r1", options))["args"][1:6] == args[2:7]  # the warm worker too


def test_an_edited_bundle_is_asked_about_again(bundles, tmp_path, capsys) -> None:
    renal = copy_bundle(bundles, RENAL, tmp_path)
    settings = Settings()
    store = TrustStore(settings.value, settings.set_value)
    store.record(parse_code_report(engine_report(renal, capsys)), trusted=True)
    assert trust_decision(model_of(renal), store).action == "run"
    script = renal / "scripts" / "networks" / "unest.py"
    script.write_text(script.read_text() + "\n# one more line\n")
    again = trust_decision(model_of(renal), store)
    assert again.action == "ask" and "changed" in again.reason and again.digest == ""
    with pytest.raises(NeedsTrust):
        run_arguments(again)
    # another spelling of the same place is the same decision; the same bundle elsewhere another one
    (tmp_path / "via").symlink_to(tmp_path)
    spelled = tmp_path / "via" / RENAL
    assert bundle_trust.bundle_key(str(spelled)) == bundle_trust.bundle_key(str(renal))
    assert trust_decision(model_of(spelled), store).reason == again.reason
    # the same bundle at another path is another decision
    other = copy_bundle(bundles, RENAL, tmp_path / "elsewhere")
    assert trust_decision(model_of(other), store).action == "ask"


def test_a_bundle_needing_no_code_runs_as_a_card_and_broken_settings_trust_nothing(bundles, capsys) -> None:
    settings = Settings()
    store = TrustStore(settings.value, settings.set_value)
    spleen = bundles / "spleen_ct_segmentation"
    store.record(parse_code_report(engine_report(spleen, capsys)), trusted=True)  # nothing to trust
    decision = trust_decision(model_of(spleen), store)
    assert decision.action == "run" and decision.digest == "" and run_arguments(decision) == {"trusted_bundle_digest": ""}
    assert trust_decision({"id": "demo", "card_path": "demo.json"}, store).action == "run"  # a card
    for broken in ("{not json", "[1, 2]", json.dumps({str(spleen): {"digest": 5, "trusted": "yes"}})):
        settings[bundle_trust.SETTINGS_KEY] = broken
        assert store.decisions() == {} and trust_decision(model_of(spleen), store).action == "ask"
    with pytest.raises(ValueError):
        parse_code_report(json.dumps({"bundle": "x", "digest": "sha256:0", "needs_trust": True, "code": []}))


# -- a run from the panel's runner, on slicer-core ------------------------------------------------
def test_the_runner_starts_a_bundle_needing_trust_only_once_trusted(context, tmp_path, capsys) -> None:
    """The small spleen bundle (random weights) with a pixdim computed by an expression: refused
    without trust (nothing started, no run folder left), then asked about through the engine
    (runner.query_bundle_code), trusted, and run end to end with --trust-bundle-code."""
    from slicer_scene import load_ct
    from test_slicer_bundle_chain import small_spleen_bundle
    from VolSegSlicerLib.runner import EngineRunner
    from VolSegSlicerLib.settings import RunSettings

    cards = tmp_path / "cards"
    cards.mkdir()
    bundle = small_spleen_bundle(cards)
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["pixdim"] = "$[4.0, 4.0, 2.0 * 3]"
    config["preprocessing"]["transforms"][3]["pixdim"] = "@pixdim"
    path.write_text(json.dumps(config))
    (tmp_path / "runs").mkdir()
    runner = EngineRunner(context, str(MODULE_DIR), temp_root=str(tmp_path / "runs"))
    settings = Settings()
    store = TrustStore(settings.value, settings.set_value)
    try:
        received: dict = {}
        runner.wait_for(runner.query_models(str(cards), lambda models, error: received.update(models=models)), timeout=120)
        model = next(m for m in received["models"] if m["id"] == "spleen-ct-segmentation")
        volume = load_ct(context)
        with pytest.raises(NeedsTrust):
            runner.segment(model, [volume], RunSettings(device="cpu"), cards_dir=str(cards), trust=store)
        run_folders = [d for d in os.listdir(tmp_path / "runs") if not d.startswith("VolSegSlicer-engine-")]
        assert runner.jobs == [] and run_folders == []  # no input written, no engine started
        answer: dict = {}
        runner.wait_for(runner.query_bundle_code(model["bundle"]["path"], lambda r, e: answer.update(report=r, error=e)),
                        timeout=120)
        report = answer["report"]
        assert report is not None, answer["error"]
        assert report.needs_trust and "  pixdim: $[4.0, 4.0, 2.0 * 3]" in trust_question(report).splitlines()
        store.record(report, trusted=False)  # Cancel: still refused
        with pytest.raises(NeedsTrust):
            runner.segment(model, [volume], RunSettings(device="cpu"), cards_dir=str(cards), trust=store)
        store.record(report, trusted=True)  # Trust
        events: list = []
        job = runner.segment(model, [volume], RunSettings(device="cpu"), cards_dir=str(cards), trust=store,
                             on_event=lambda j, line: events.append(line))
        assert "--trust-bundle-code" in job.process.argv and "--bundle-sha256" in job.process.argv
        runner.wait_for(job, timeout=240)
        assert job.monitor.outcome == "done", job.monitor.error
        assert job.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1
        assert any(line and "running the bundle's code: pixdim" in line for line in events)
    finally:
        runner.shutdown()
