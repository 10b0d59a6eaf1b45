"""The ``volseg`` command line.

::

    volseg segment CT.nrrd --model uxnet-flare --checkpoint best_metric_model.pth -o CT.seg.nrrd
    volseg models [--json]
    volseg inspect best_metric_model.pth [--json]
    volseg devices [--json]
    volseg segment CT.nrrd --bundle spleen_ct_segmentation -o spleen.seg.nrrd
    volseg bundle-card spleen_ct_segmentation -o spleen.json
    volseg demo [-o FOLDER]
    volseg batch cases/*.nii.gz --model uxnet-flare --checkpoint best_metric_model.pth -o results/
    volseg serve            # warm worker: JSON requests on stdin, JSON events on stdout
    volseg server [--host H --tls-cert C --tls-key K]   # HTTP(S) server for other machines

Errors are one message (and a hint) with a non-zero exit code: 2 for bad input, 3 for missing
resources (memory, device, disk space or inodes), 130 for a cancelled run (SIGINT/SIGTERM at any
moment, see :mod:`volseg.signals`). Nothing is written when a run fails.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from volseg import signals
from volseg.cli.batch import cmd_batch
from volseg.cli.bundle import cmd_bundle_card, cmd_bundle_code
from volseg.cli.catalogue import cmd_devices, cmd_inspect, cmd_models
from volseg.cli.demo import cmd_demo
from volseg.cli.parser import build_parser
from volseg.cli.segment import cmd_segment
from volseg.cli.serve import cmd_serve
from volseg.cli.server import cmd_server
from volseg.errors import VolSegError, error_from_exception

COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "models": cmd_models, "inspect": cmd_inspect, "devices": cmd_devices,
            "demo": cmd_demo, "serve": cmd_serve, "server": cmd_server,
            "bundle-card": cmd_bundle_card, "bundle-code": cmd_bundle_code}


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        with signals.installed():
            args = build_parser().parse_args(argv)
            if signals.pending():
                return signals.report_cancelled(words)
            code = COMMANDS[args.command](args)
            if code == 0 and signals.pending():  # a signal during an import, not acted on since
                return signals.report_cancelled(words)
            return code
    except Exception as exc:  # failures outside a reported run (models, inspect, devices): one message
        if os.environ.get("VOLSEG_DEBUG") and not isinstance(exc, VolSegError):
            raise
        err = error_from_exception(exc)
    except KeyboardInterrupt:  # a signal before or after a reported run (parsing, imports)
        return signals.report_cancelled(words)
    if signals.pending():
        return signals.report_cancelled(words)
    if signals.wants_json(words):  # the Slicer module reads one JSON error event, even here
        print(json.dumps({"event": "error", "message": err.message, "hint": err.hint, "exit_code": err.exit_code}),
              flush=True)
        return err.exit_code
    print(f"error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"  hint: {err.hint}", file=sys.stderr)
    return err.exit_code

def entry_point() -> None:
    """The ``volseg`` console script: :func:`main`, and once a command has finished (exit 0) a
    late SIGINT/SIGTERM is ignored while the interpreter exits (see :func:`signals.ignore_from_now`)."""
    code = main()
    if code == 0:
        signals.ignore_from_now()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
