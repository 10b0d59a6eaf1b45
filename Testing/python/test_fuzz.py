"""The fuzz suite in CI: a few hundred seeded hostile inputs (``bench/fuzz_run.py`` runs
thousands) through the CLI's entry point in one warm, memory-capped worker; every case must be
a clean refusal or a segmentation on the input grid. Also checks that the harness itself still
tells a failure from a refusal, so it cannot rot into always passing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

CI_SEED = 20261129
CI_CASES = 200


@pytest.fixture(scope="module")
def fuzz(repo_root: Path):
    folder = str(repo_root / "bench")
    sys.path.insert(0, folder)
    try:
        import fuzz_cases
        import fuzz_run

        yield fuzz_run, fuzz_cases
    finally:
        sys.path.remove(folder)


def test_seeded_hostile_inputs_all_end_cleanly(fuzz):
    fuzz_run, fuzz_cases = fuzz
    results = fuzz_run.run_cases(CI_SEED, list(range(CI_CASES)), timeout=30.0, memory_cap=1 << 30)
    print("\n" + fuzz_run.summary_table(results))
    failures = [r for r in results if r["outcome"] not in ("refused", "segmented")]
    assert not failures, "\n".join(f"case {r['index']} ({r['family']}): {r['reason']}" for r in failures)
    families = {r["family"] for r in results}
    assert families == set(fuzz_cases.FAMILIES)
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"refused", "segmented"}  # the mutations are neither all fatal nor all harmless


def _case(tmp_path: Path) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    return {"output": str(out / "seg.nrrd"), "inputs": [], "family": "nifti"}


def _error(message: str, code: int = 2) -> str:
    return json.dumps({"event": "error", "message": message, "hint": None, "exit_code": code}) + "\n"


def test_the_classifier_tells_failures_from_refusals(fuzz, tmp_path):
    fuzz_run, _ = fuzz
    case = _case(tmp_path)
    assert fuzz_run.classify(2, _error("x.nii: the header declares 9x9x9 voxels"), "", case)[0] == "refused"
    assert fuzz_run.classify(1, _error("internal error (KeyError: 3)", 1), "", case)[0] == "failure"
    assert fuzz_run.classify(2, _error("fine"), "qform_code 999 not valid\n", case)[0] == "failure"
    assert fuzz_run.classify(3, _error("out of memory", 3), "", case)[0] == "failure"
    assert fuzz_run.classify(2, _error("cannot read x: std::bad_alloc"), "", case)[0] == "failure"
    assert fuzz_run.classify(2, _error("cannot write /o/.volseg-stage-1/seg.nrrd"), "", case)[0] == "failure"
    assert fuzz_run.classify(2, "Traceback (most recent call last):\n", "", case)[0] == "failure"
    assert fuzz_run.classify(130, _error("cancelled", 130), "", case)[0] == "failure"
    assert fuzz_run.classify(0, json.dumps({"event": "done"}) + "\n", "", case)[0] == "failure"  # no file written
    (Path(case["output"]).parent / ".seg.volseg-tmp-0123456789ab.nrrd").write_bytes(b"x")
    assert fuzz_run.classify(2, _error("refused"), "", case)[0] == "failure"  # left a file behind


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes() if path.suffix != ".dcm" else b"")  # DICOM files carry fresh UIDs
    return h.hexdigest()


def test_cases_are_reproducible_from_seed_and_index(fuzz, tmp_path):
    fuzz_run, fuzz_cases = fuzz
    (tmp_path / "assets").mkdir()
    assets = fuzz_run._assets(tmp_path / "assets")
    seen = set()
    for index in range(40):
        family = fuzz_cases.family_of(CI_SEED, index)
        if family in seen:
            continue
        seen.add(family)
        digests = []
        for attempt in range(2):
            folder = tmp_path / f"{index}-{attempt}"
            folder.mkdir()
            case = fuzz_cases.make_case(CI_SEED, index, folder, assets)
            assert case["family"] == family
            digests.append(_digest(folder / "in"))
        assert digests[0] == digests[1], family
    assert seen == set(fuzz_cases.FAMILIES)
