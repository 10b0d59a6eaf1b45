"""``volseg demo``: the bundled chest CT through the demonstration model."""

from __future__ import annotations

import argparse

from volseg.cli.running import cancel_on_signal, run_reported


def cmd_demo(args: argparse.Namespace) -> int:
    from volseg.demo.run import run_demo
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    with cancel_on_signal() as cancel:
        return run_reported(reporter, lambda: run_demo(args.output_dir, args.device, reporter, cancel,
                                                               overwrite=args.overwrite))
