"""``volseg batch``: many cases with one model, loaded once.

What a path on the command line becomes:

* a volume file: one case (single-input models);
* a DICOM series folder: one case (single-input models);
* any other folder, for a **single-input** model: one case per volume file in it (NIfTI, NRRD,
  MHA/MHD, sorted by name; hidden files and other files are ignored) and per DICOM series
  sub-folder, so ``volseg batch cases/`` segments every volume in ``cases/``;
* any other folder, for a **multi-input** model: one case, the folder holding one file per
  input, each matched to its input by the card's name hints.

Results go to ``OUT_DIR/<case name><suffix>`` (two cases whose names differ only in case are
refused, as they would clash on macOS and Windows). A case that fails, for whatever reason, is
reported as an error event and the others go on; the exit code is then 1.

The output folder keeps a manifest, ``volseg-manifest.jsonl`` (:mod:`volseg.cohort.manifest`): one
row per case with its status, result files, timings, device and error. A re-run skips the cases
already done with the same model card, checkpoint, options and inputs, redoes those whose
result was made with other settings, and leaves any other existing file alone (reported)
unless ``--overwrite``. Ctrl-C stops the run after the case being segmented (a second Ctrl-C at
once); finished cases are kept, the others are recorded as not done.

With ``--cluster`` the cases go to a pool of Ray actors instead (:mod:`volseg.cohort.cluster`); Ray is
imported only then.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volseg.cohort.case_runner import Job, run_case
from volseg.cohort.cases import Case, find_cases  # noqa: F401  (Case: part of this module's API)
from volseg.checkpoints.reading import sha256sum
from volseg.cohort.progress import CohortProgress, FoldedCaseOutput
from volseg.errors import Cancelled, CheckpointError, error_from_exception
from volseg.io import make_output_folder, segmentation_outputs
from volseg.cohort.manifest import (
    SKIPPED,
    Manifest,
    file_records,
    input_signature,
    sha256_of_json,
)
from volseg.pipeline import ModelCache
from volseg.progress import Reporter, TextReporter
from volseg.request import SegmentRequest, checkpoint_for

if TYPE_CHECKING:
    from volseg.cohort.cluster import ClusterSettings


def run_settings(template: SegmentRequest, suffix: str, checkpoint: Path) -> dict[str, Any]:
    """What a result depends on besides its inputs: the card, the checkpoint's SHA-256, the options.

    JSON round-tripped so that it compares equal to the same settings read back from a manifest.
    """
    settings = {"model": template.card.id, "card_sha256": sha256_of_json(template.card.raw),
                "checkpoint_sha256": sha256sum(checkpoint), "options": {**asdict(template.overrides), "format": suffix}}
    return json.loads(json.dumps(settings, default=str))


def run_batch(template: SegmentRequest, paths: list[Path], out_dir: Path, suffix: str, reporter: Reporter,
              cancel: threading.Event | None = None, cluster: ClusterSettings | None = None) -> dict:
    """Segment every case, here or on a Ray cluster; keep the manifest of ``out_dir``.

    Cases that a re-run may skip (see :mod:`volseg.cohort.manifest`) are skipped. Returns a summary
    ``{"done": [...], "skipped": [...], "failed": [...], "not_done": [...], "manifest": path}``.

    Raises:
        Cancelled: ``cancel`` was set (or a second Ctrl-C came): the cases that finished are
            kept and recorded, the others are recorded as not done.
        VolSegError: the cases or the output folder are unusable (nothing is run then).
    """
    cases = find_cases(paths, template.card)
    checkpoint = checkpoint_for(template.card, template.checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist", hint="check the path given with --checkpoint or in the card")
    settings = run_settings(template, suffix, checkpoint)
    make_output_folder(out_dir)
    cancel = cancel or threading.Event()
    summary: dict[str, Any] = {"done": [], "skipped": [], "failed": [], "not_done": []}
    # on a terminal the bar is redrawn in place, each case's own lines folded into it
    progress = CohortProgress(reporter, len(cases), inline=True)
    with Manifest(out_dir) as manifest:
        summary["manifest"] = str(manifest.path)
        if manifest.unreadable_lines:
            reporter.log(f"{manifest.unreadable_lines} unreadable line(s) in {manifest.path} were ignored", "warning")
        jobs, made_with, names = _plan_cases(cases, out_dir, suffix, template.overwrite, settings, manifest,
                                             reporter, progress, summary)
        finished: set[str] = set()

        def finish(job: Job, outcome: dict[str, Any]) -> None:
            finished.add(job.name)
            status = outcome["status"]
            if status == "done":  # the worker's view of the files it wrote (see run_case)
                outputs = outcome.get("outputs") or file_records(out_dir, names[job.name]) or []
                result = {"outputs": outputs, "made_with": made_with[job.name]}
            else:
                result = manifest.kept_result(job.name, names[job.name])
            measured = {k: outcome.get(k) for k in ("elapsed_s", "cpu_s", "overhead_s", "timings", "device", "where",
                                                    "node", "worker", "error")}
            manifest.record({"case": job.name, "status": status, "inputs": [str(p) for p in job.inputs], **result,
                             **measured, "attempts": job.attempts})
            summary[status].append(job.name)
            for warning in outcome.get("warnings") or []:
                if cluster is not None:  # a local run's warnings were printed as they came
                    progress.break_line()
                    reporter.log(f"{job.name}: {warning}", "warning")
            error = outcome.get("error") or {}
            if status == "failed" and not isinstance(reporter, TextReporter):  # text: the bar prints it once, below
                reporter.error(f"{job.name}: {error.get('message')}", error.get("hint"), error.get("exit_code", 1))
            progress.case(job.name, status, elapsed_s=outcome.get("elapsed_s"), device=outcome.get("device"),
                          node=outcome.get("node"), attempt=job.attempts,
                          outputs=[r["name"] for r in result["outputs"] or []] if status == "done" else None,
                          message=error.get("message") if status != "done" else None,
                          hint=error.get("hint") if status == "failed" else None)

        def retry(job: Job, message: str) -> None:
            progress.case(job.name, "retry", attempt=job.attempts, message=message)

        interrupted, left_because = False, "cancelled before it ran"
        try:
            if cluster is None:
                _run_here(template, jobs, reporter, finish, cancel, progress)
            else:
                # Ray is imported only here, when asked for
                from volseg.cohort.cluster import run_on_cluster

                def log(message: str, level: str) -> None:
                    progress.break_line()
                    reporter.log(message, level)

                progress.begin_case()
                run_on_cluster(template, jobs, cluster, log, finish, retry, cancel)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as exc:  # e.g. the cluster cannot be reached: reported by the caller
            left_because = f"not run: the batch stopped ({error_from_exception(exc).message})"
            raise
        finally:
            for job in jobs:
                if job.name not in finished:
                    finish(job, {"status": "not_done", "error": {"message": left_because, "hint": None,
                                                                  "exit_code": Cancelled.exit_code}})
    progress.break_line()
    if interrupted or cancel.is_set():
        raise Cancelled(f"cancelled: {len(summary['done'])} case(s) done, {len(summary['failed'])} failed, "
                        f"{len(summary['not_done'])} not done", hint=f"the manifest {summary['manifest']} lists "
                        "them; run the same command again to do the rest")
    return summary


def _plan_cases(cases: list[Case], out_dir: Path, suffix: str, overwrite: bool, settings: dict[str, Any],
                manifest: Manifest, reporter: Reporter, progress: CohortProgress,
                summary: dict[str, Any]) -> tuple[list[Job], dict[str, dict], dict[str, list[str]]]:
    """Decide for each case whether it runs (a :class:`Job`) or is skipped (reported and recorded)."""
    jobs, made_with, names = [], {}, {}
    up_to_date = 0
    for case in cases:
        out = out_dir / f"{case.name}{suffix}"
        names[case.name] = [p.name for p in segmentation_outputs(out)]
        made_with[case.name] = {**settings, "inputs": input_signature(case.inputs)}
        plan = manifest.plan(case.name, names[case.name], made_with[case.name], overwrite)
        if plan.action == "run":
            if plan.reason and plan.reason != "--overwrite":
                reporter.log(f"{case.name}: {plan.reason}")
            fresh = not any((out_dir / name).exists() for name in names[case.name])
            jobs.append(Job(case.name, list(case.inputs), out, plan.overwrite, fresh=fresh))
            continue
        summary["skipped"].append(case.name)
        if manifest.owned(case.name, names[case.name]):
            up_to_date += 1
        else:
            reporter.log(f"{case.name}: {plan.reason}; skipped", "warning")
            manifest.record({"case": case.name, "status": SKIPPED, "inputs": [str(p) for p in case.inputs],
                             "outputs": [], "made_with": None, "error": {"message": plan.reason, "hint": None}})
        progress.case(case.name, "skipped", message=plan.reason)
    if up_to_date:
        reporter.log(f"{up_to_date} case(s) done before with the same model, checkpoint, options and inputs: skipped"
                     " (pass --overwrite to redo them)")
    return jobs, made_with, names


def _run_here(template: SegmentRequest, jobs: list[Job], reporter: Reporter,
              finish: Callable[[Job, dict[str, Any]], None], cancel: threading.Event,
              progress: CohortProgress | None = None) -> None:
    """The plain batch: one case after the other in this process, the model loaded once.

    Cases are numbered among all cases of the cohort (skipped ones count), as the bar counts them.
    """
    cache = ModelCache()
    for n, job in enumerate(jobs, 1):
        if cancel.is_set():
            return
        number, total = (progress.number, progress.total) if progress else (n, len(jobs))
        parent: Reporter = reporter
        if progress is not None:
            progress.begin_case()
            if progress.folds:  # a terminal: the case's lines go into the bar's line
                parent = FoldedCaseOutput(progress, f"case {number}/{total} {job.name}")
        if parent is reporter:
            if progress is not None:
                progress.break_line()
            reporter.log(f"case {number}/{total}: {job.name}")
        job.attempts += 1
        finish(job, run_case(template, job, parent, cancel, cache))
