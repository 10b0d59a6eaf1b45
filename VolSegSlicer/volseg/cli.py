"""The ``volseg`` command line.

::

    volseg segment CT.nrrd --model uxnet-flare --checkpoint best_metric_model.pth -o CT.seg.nrrd
    volseg models [--json]
    volseg inspect best_metric_model.pth [--json]
    volseg devices [--json]
    volseg demo [-o FOLDER]
    volseg batch cases/*.nii.gz --model uxnet-flare --checkpoint best_metric_model.pth -o results/
    volseg serve            # warm worker: JSON requests on stdin, JSON events on stdout

Errors are one message (and a hint) with a non-zero exit code: 2 for bad input, 3 for missing
resources (memory, device), 130 for a cancelled run. Nothing is written when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volseg import __version__
from volseg.errors import Cancelled, ResourceError, VolSegError


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="input volume(s): NIfTI, NRRD, MHA/MHD or a DICOM folder; one per channel")
    model = p.add_argument_group("model")
    model.add_argument("--model", "-m", help="model card id (see `volseg models`) or path to a card .json")
    model.add_argument("--arch", help="architecture for a checkpoint without a card (with --num-labels)")
    model.add_argument("--num-labels", type=int, help="number of foreground labels, with --arch")
    model.add_argument("--arch-config", type=json.loads, default=None, metavar="JSON",
                       help="constructor arguments for --arch as JSON, e.g. '{\"feat_size\": [48,96,192,384]}'")
    model.add_argument("--checkpoint", "-c", type=Path, help="weights file (overrides the card's)")
    model.add_argument("--cards-dir", action="append", default=[], help="extra folder of model cards (repeatable)")
    model.add_argument("--trust-pickle", action="store_true",
                       help="allow full unpickling of the checkpoint: this can run code, use only for files you trust")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, required=True,
                     help="result: .seg.nrrd, .nii/.nii.gz/.nrrd/.mha label map, or .dcm DICOM SEG (DICOM input)")
    out.add_argument("--probabilities", type=Path, help="also write the class probabilities (.nii.gz or .nrrd)")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    run = p.add_argument_group("inference")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    run.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window size")
    run.add_argument("--overlap", type=float, help="window overlap, 0 <= overlap < 1")
    run.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    run.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None, help="test-time flips from the card")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision on GPU")
    post = p.add_argument_group("postprocessing")
    post.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the largest connected component of each label")
    post.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None, help="fill enclosed holes")
    post.add_argument("--min-island-mm3", type=float, help="remove islands smaller than this volume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volseg", description="AI segmentation of CT and MRI volumes.")
    parser.add_argument("--version", action="version", version=f"volseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a volume")
    _add_segment_options(seg)
    seg.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                     help="bar: human output on stderr; json: one JSON event per line on stdout")

    mod = sub.add_parser("models", help="list the model cards")
    mod.add_argument("--json", action="store_true")
    mod.add_argument("--cards-dir", action="append", default=[])
    mod.add_argument("--architectures", action="store_true", help="list the registered architectures instead")

    ins = sub.add_parser("inspect", help="what a checkpoint holds and which architecture it fits")
    ins.add_argument("checkpoint", type=Path)
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--trust-pickle", action="store_true")

    dev = sub.add_parser("devices", help="list compute devices and what auto picks")
    dev.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="segment the bundled chest CT with the demonstration model")
    demo.add_argument("-o", "--output-dir", type=Path, default=None, help="folder for the results (default: a new ./volseg-demo*)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--progress", choices=("bar", "json", "none"), default="bar")

    batch = sub.add_parser("batch", help="segment many cases with one model (loaded once)")
    _add_segment_options(batch)
    for action in batch._actions:  # -o is a folder here
        if action.dest == "output":
            action.help, action.metavar = "folder for the results (created if missing)", "OUT_DIR"
    batch.add_argument("--format", default=".seg.nrrd", choices=(".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"),
                       help="result format (default .seg.nrrd)")
    batch.add_argument("--progress", choices=("bar", "json", "none"), default="bar")

    sub.add_parser("serve", help="warm worker: one JSON request per stdin line, JSON events on stdout")
    return parser


# -- segment ------------------------------------------------------------------------------------
def request_from_args(args: argparse.Namespace):
    from volseg.cards import card_from_arguments, load_card
    from volseg.errors import ModelCardError
    from volseg.pipeline import Overrides, SegmentRequest

    if args.model and args.arch:
        raise ModelCardError("give either --model or --arch, not both")
    if args.model:
        card = load_card(args.model, args.cards_dir)
    elif args.arch:
        if not args.num_labels or args.num_labels < 1:
            raise ModelCardError("--arch needs --num-labels N (the number of foreground labels)")
        card = card_from_arguments(args.arch, args.num_labels, in_channels=len(args.inputs), config=args.arch_config)
    else:
        raise ModelCardError("no model given", hint="pass --model ID (see `volseg models`) or --arch NAME --num-labels N")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise VolSegError(f"--overlap {args.overlap} is outside [0, 1)")
    for name in ("sw_batch_size", "min_island_mm3"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "sw_batch_size" else 0):
            raise VolSegError(f"--{name.replace('_', '-')} {value} is out of range")
    if args.roi_size is not None and min(args.roi_size) < 1:
        raise VolSegError(f"--roi-size {args.roi_size} must be positive")
    overrides = Overrides(
        roi_size=tuple(args.roi_size) if args.roi_size else None, overlap=args.overlap,
        sw_batch_size=args.sw_batch_size, flips=args.flips, amp=args.amp, keep_largest=args.keep_largest,
        fill_holes=args.fill_holes, min_island_mm3=args.min_island_mm3)
    return SegmentRequest(inputs=args.inputs, card=card, output=args.output, checkpoint=args.checkpoint,
                          probabilities=args.probabilities, overwrite=args.overwrite, device=args.device,
                          trust_pickle=args.trust_pickle, overrides=overrides)


class _CancelOnSignal:
    """Turns SIGINT/SIGTERM into a cancel request the pipeline honours between windows."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> threading.Event:
        # SIGBREAK is what CTRL_BREAK_EVENT (the Slicer module's cancel on Windows) delivers.
        for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self.event

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.event.is_set():  # second signal: stop now (atomic writes still leave nothing behind)
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _run_reported(reporter, fn) -> int:
    """Run ``fn``; report any failure as one error event (no traceback) and return the exit code.

    Set ``VOLSEG_DEBUG=1`` to get the traceback of an unexpected error instead.
    """
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        err: VolSegError = Cancelled()
    except VolSegError as exc:
        err = exc
    except MemoryError:
        err = ResourceError("out of memory", hint="use a smaller ROI (--roi-size), a smaller volume, or free memory")
    except Exception as exc:  # a bug: say so plainly, keep the traceback for those who ask
        if os.environ.get("VOLSEG_DEBUG"):
            raise
        if "can't allocate memory" in str(exc) or "not enough memory" in str(exc):
            err = ResourceError("out of memory: " + str(exc).splitlines()[0],
                                hint="use a smaller ROI (--roi-size), a smaller volume, or free memory")
        else:
            err = VolSegError(f"internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                              hint="this is a bug in volseg: please report it with the command line; "
                              "VOLSEG_DEBUG=1 shows the traceback")
            err.exit_code = 1
    reporter.error(err.message, err.hint, err.exit_code)
    return err.exit_code


def cmd_segment(args: argparse.Namespace) -> int:
    from volseg.pipeline import segment
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    with _CancelOnSignal() as cancel:
        return _run_reported(reporter, lambda: segment(request_from_args(args), reporter, cancel))


# -- models / inspect / devices -------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from volseg.cards import list_cards

    if args.architectures:
        from volseg import models

        archs = models.all_architectures()
        if args.json:
            print(json.dumps({"architectures": [{"name": a.name, "summary": a.summary} for a in archs]}, indent=1))
        else:
            for a in archs:
                print(f"{a.name:14s} {a.summary}")
        return 0
    cards, problems = list_cards(args.cards_dir)
    for p in problems:
        print(f"warning: skipped invalid card {p}", file=sys.stderr)
    if args.json:
        print(json.dumps({"models": [c.summary() for c in cards], "problems": problems}, indent=1))
        return 0
    for c in cards:
        inputs = ", ".join(i.name for i in c.inputs)
        labels = ", ".join(lab.name for lab in c.labels)
        print(f"{c.id}\n  {c.title}\n  architecture {c.architecture}; inputs: {inputs}\n  labels: {labels}")
        where = c.raw.get("checkpoint", {}).get("published_at")
        if c.checkpoint_path:
            print(f"  checkpoint: {c.checkpoint_path}")
        elif where:
            print(f"  weights: {where}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from volseg.checkpoints import describe, read_checkpoint

    info = describe(read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"{info['path']}\n  format: {info['format']}" + (f" (weights under {'/'.join(info['wrapper'])})" if info["wrapper"] else ""))
    if info["stripped_prefixes"]:
        print(f"  stripped key prefixes: {' '.join(info['stripped_prefixes'])}")
    print(f"  {info['n_keys']} tensors, {info['n_params']:,} parameters")
    if not info["matches"]:
        print("  fits no registered architecture exactly; first keys: " + ", ".join(info.get("first_keys", [])))
        return 0
    for m in info["matches"]:
        print(f"  fits {m['architecture']}: {m['variant']}\n    config {json.dumps(m['config'])}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from volseg.devices import auto_device, list_devices

    devices = list_devices()
    auto, reason = auto_device()
    if args.json:
        print(json.dumps({"devices": [d.as_dict() for d in devices], "auto": auto, "reason": reason}))
        return 0
    for d in devices:
        mem = f", {d.free_memory_mb} of {d.total_memory_mb} MiB free" if d.total_memory_mb else ""
        print(f"{d.id:8s} {d.name}{mem}")
    print(f"auto -> {auto} ({reason})")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from volseg.batch import run_batch
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    summary: dict = {}

    def run() -> None:
        if args.probabilities is not None:
            raise VolSegError("--probabilities is for single runs", hint="use `volseg segment` per case")
        template = request_from_args(args)
        summary.update(run_batch(template, list(args.inputs), args.output, args.format, reporter, cancel))
        reporter.log(f"batch: {len(summary['done'])} done, {len(summary['skipped'])} skipped, "
                     f"{len(summary['failed'])} failed")

    with _CancelOnSignal() as cancel:
        rc = _run_reported(reporter, run)
    return rc or (1 if summary.get("failed") else 0)


# -- demo / serve ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from volseg.demo import run_demo
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    with _CancelOnSignal() as cancel:
        return _run_reported(reporter, lambda: run_demo(args.output_dir, args.device, reporter, cancel))


def cmd_serve(_: argparse.Namespace) -> int:
    """Warm worker: each stdin line is ``{"id": ..., "args": [segment arguments]}`` or
    ``{"cancel": id}``; answers are the JSON events of ``segment --progress json`` tagged with
    ``"request": id``. The loaded model stays in memory between requests."""
    from volseg.pipeline import ModelCache, segment
    from volseg.progress import JsonReporter

    parser = argparse.ArgumentParser(prog="volseg serve", exit_on_error=False)
    _add_segment_options(parser)
    cache, lines, cancel = ModelCache(), queue.Queue(), threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                msg = {"invalid": line.strip()}
            if isinstance(msg, dict) and "cancel" in msg:
                cancel.set()
            else:
                lines.put(msg)
        lines.put(None)

    threading.Thread(target=read_stdin, daemon=True).start()
    while (msg := lines.get()) is not None:
        rid = msg.get("id") if isinstance(msg, dict) else None
        reporter = JsonReporter(sys.stdout, request=rid)
        cancel.clear()
        try:
            if not isinstance(msg, dict) or not isinstance(msg.get("args"), list):
                raise VolSegError(f"bad request {msg!r}", hint='send {"id": ..., "args": ["in.nrrd", "--model", ...]}')
            try:
                args = parser.parse_args([str(a) for a in msg["args"]])
            except (argparse.ArgumentError, SystemExit) as exc:
                raise VolSegError(f"bad segment arguments: {exc}") from None
        except VolSegError as err:
            reporter.error(err.message, err.hint, err.exit_code)
            continue
        _run_reported(reporter, lambda: segment(request_from_args(args), reporter, cancel, cache))
    return 0


COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "models": cmd_models, "inspect": cmd_inspect, "devices": cmd_devices,
            "demo": cmd_demo, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VolSegError as err:  # errors outside a reported run (models, inspect, devices)
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except Exception as exc:  # a bug in models/inspect/devices: one line, as for segment
        if os.environ.get("VOLSEG_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {exc})\n  hint: this is a bug in volseg: please "
              "report it with the command line; VOLSEG_DEBUG=1 shows the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
