"""``volseg batch``: many cases with one model, here or on a Ray cluster."""

from __future__ import annotations

import argparse

from volseg.cli.running import cancel_on_signal, run_reported
from volseg.cli.segment import request_from_args
from volseg.errors import InputError, OutputError


def cluster_from_args(args: argparse.Namespace):
    """The batch's ``--cluster`` settings (None without ``--cluster``); bad values are refused."""
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1")
    if args.retries < 0:
        raise InputError(f"--retries {args.retries} must be 0 or more")
    if args.cluster is None:
        if args.workers is not None:
            raise InputError("--workers is for --cluster runs", hint="add --cluster local (or auto, or ray://HOST:PORT)")
        return None
    from volseg.cohort.cluster import ClusterSettings, check_address, require_ray

    check_address(args.cluster)
    require_ray()  # before any work: a missing Ray is one message
    return ClusterSettings(args.cluster, args.workers, args.retries)


def cmd_batch(args: argparse.Namespace) -> int:
    from volseg.progress import TextReporter, make_reporter

    reporter = make_reporter(args.progress)
    summary: dict = {}

    def run() -> None:
        from volseg.checkpoints.sniffing import checkpoint_kind
        from volseg.cohort.cases import find_cases
        from volseg.io.atomic import check_output_folder, full_suffix
        from volseg.io.outputs import SEGMENTATION_SUFFIXES
        from volseg.request import check_device_name, check_runtime_name, checkpoint_for

        template = request_from_args(args)
        cluster = cluster_from_args(args)
        check_device_name(template.device)  # refuse what needs no torch before importing it
        check_runtime_name()
        missing = next((p for p in args.inputs if not p.exists()), None)
        if missing is not None:
            raise InputError(f"{missing} does not exist")
        check_output_folder(args.output)  # -o FILE
        suffix = full_suffix(args.output).lower()
        if not args.output.exists() and suffix in SEGMENTATION_SUFFIXES:
            raise OutputError(f"-o {args.output} names a file, but batch writes one result per case into a folder",
                              hint=f"give a folder, e.g. -o {args.output.parent / 'results'} --format {suffix}")
        find_cases(list(args.inputs), template.card)  # an empty folder, clashing names
        checkpoint_kind(checkpoint_for(template.card, template.checkpoint))
        from volseg.cohort.batch import run_batch

        summary.update(run_batch(template, list(args.inputs), args.output, args.format, reporter, cancel, cluster))
        line = (f"batch: {len(summary['done'])} done, {len(summary['skipped'])} skipped, "
                f"{len(summary['failed'])} failed; manifest {summary['manifest']}")
        if isinstance(reporter, TextReporter):  # the last line, also with --progress none
            reporter.stream.write(line + "\n")
            reporter.stream.flush()
        else:
            reporter.log(line)

    with cancel_on_signal() as cancel:
        rc = run_reported(reporter, run)
    return rc or (1 if summary.get("failed") else 0)
