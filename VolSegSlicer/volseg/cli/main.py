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
resources (memory, device, disk space or inodes), 130 for a cancelled run (SIGINT/SIGTERM at any
moment, see :mod:`volseg.signals`). Nothing is written when a run fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volseg import __version__, signals
from volseg.errors import Cancelled, InputError, VolSegError, error_from_exception
from volseg.cli.help_texts import CARDS_DIR_HELP, DEVICE_HELP, PROGRESS_HELP, SEGMENT_EXAMPLES, SERVE_DESCRIPTION


def _add_segment_options(p: argparse.ArgumentParser, probabilities: bool = True) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="input volume(s): NIfTI, NRRD, MHA/MHD or a DICOM folder; one per channel")
    model = p.add_argument_group("model")
    model.add_argument("--model", "-m", help="model card id (see `volseg models`) or path to a card .json")
    model.add_argument("--arch", help="architecture for a checkpoint without a card (with --num-labels)")
    model.add_argument("--num-labels", type=int, help="number of foreground labels, with --arch")
    model.add_argument("--arch-config", type=json.loads, default=None, metavar="JSON",
                       help="constructor arguments for --arch as JSON, e.g. '{\"feat_size\": [48,96,192,384]}'")
    model.add_argument("--checkpoint", "-c", type=Path, help="weights file (overrides the card's)")
    model.add_argument("--cards-dir", action="append", default=[], metavar="FOLDER", help=CARDS_DIR_HELP)
    model.add_argument("--trust-pickle", action="store_true",
                       help="allow full unpickling of the checkpoint: this can run code, use only for files you trust")
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, required=True,
                     help="result: .seg.nrrd, .nii/.nii.gz/.nrrd/.mha label map, or .dcm DICOM SEG (DICOM input)")
    if probabilities:
        out.add_argument("--probabilities", type=Path, metavar="FILE",
                         help="also write the class probabilities, one channel per output of the network, named "
                         "in the file (.nii.gz or .nrrd; see the README for opening it in Slicer)")
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


BATCH_DESCRIPTION = """Segment many cases with one model, loaded once. Each path is:
  a volume file or a DICOM series folder   one case (single-input models)
  any other folder, single-input model     one case per volume file in it (sorted by name)
                                           and per DICOM series sub-folder
  any other folder, multi-input model      one case: the folder holds one file per input,
                                           matched by the card's name hints
Results go to OUT_DIR/<case name><format>. A failed case is reported and the others go on
(exit code 1 at the end). OUT_DIR/volseg-manifest.jsonl records every case (status, result
files, timings, device, error): a re-run skips the cases done with the same model, checkpoint,
options and inputs, redoes those made with other settings, and leaves other existing files
alone unless --overwrite. Ctrl-C keeps the finished cases; run again to do the rest.
--cluster local|auto|ray://HOST:PORT spreads the cases over Ray workers (pip install
"volseg[cluster]"); inputs and OUT_DIR must then be on a file system every node sees."""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="volseg", description="AI segmentation of CT and MRI volumes.",
                                     epilog="`volseg COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"volseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a volume", formatter_class=raw,
                         description="Segment one case: one input file (or DICOM folder) per model input.",
                         epilog=SEGMENT_EXAMPLES)
    _add_segment_options(seg)
    seg.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)

    mod = sub.add_parser("models", help="list the model cards")
    mod.add_argument("--json", action="store_true",
                     help='print {"models": [card summaries], "problems": [invalid card files]} as JSON '
                     "(what the Slicer panel reads)")
    mod.add_argument("--cards-dir", action="append", default=[], metavar="FOLDER", help=CARDS_DIR_HELP)
    mod.add_argument("--architectures", action="store_true", help="list the registered architectures instead")

    ins = sub.add_parser("inspect", help="what a checkpoint holds and which architecture it fits")
    ins.add_argument("checkpoint", type=Path, help="weights file (.pt/.pth/.bin/.ckpt/.model/.safetensors) or folder")
    ins.add_argument("--json", action="store_true",
                     help="print format, wrapper keys, stripped prefixes, tensor and parameter counts and the "
                     "fitting architectures (with their configuration) as JSON")
    ins.add_argument("--trust-pickle", action="store_true",
                     help="allow a full unpickle for files that store Python objects: this can run code, "
                     "use only for files you trust")

    dev = sub.add_parser("devices", help="list compute devices and what auto picks")
    dev.add_argument("--json", action="store_true", help='print {"devices": [...], "auto": ID, "reason": TEXT} as JSON')

    demo = sub.add_parser("demo", help="segment the bundled chest CT with the demonstration model",
                          description="Segment slicerio's chest CT with the bundled demonstration model (not a "
                          "medical model) and write CTChest4-demo.seg.nrrd and a PNG of a few slices.")
    demo.add_argument("-o", "--output-dir", type=Path, default=None, help="folder for the results (default: a new ./volseg-demo*)")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)
    demo.add_argument("--overwrite", action="store_true", help="replace the demo results already in the -o folder")

    batch = sub.add_parser("batch", help="segment many cases with one model (loaded once)",
                           formatter_class=raw, description=BATCH_DESCRIPTION)
    _add_segment_options(batch, probabilities=False)
    for action in batch._actions:  # -o is a folder here
        if action.dest == "output":
            action.help, action.metavar = "folder for the results (created if missing)", "OUT_DIR"
        elif action.dest == "inputs":
            action.help = "cases: volume files, DICOM series folders, folders of volumes or case folders (see above)"
    batch.add_argument("--format", default=".seg.nrrd", choices=(".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"),
                       help="result format (default .seg.nrrd)")
    batch.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help=PROGRESS_HELP)
    spread = batch.add_argument_group("cluster (Ray)")
    spread.add_argument("--cluster", metavar="local|auto|ray://HOST:PORT",
                        help="run the cases on Ray workers: local starts Ray on this machine, auto joins the "
                        "cluster this machine belongs to")
    spread.add_argument("--workers", type=int, help="Ray workers, each holding the model (default: one per GPU, "
                        "else as many as the CPUs allow)")
    spread.add_argument("--retries", type=int, default=2,
                        help="times a case is tried again when its worker dies (default 2)")

    sub.add_parser("serve", help="warm worker: one JSON request per stdin line, JSON events on stdout",
                   formatter_class=raw, description=SERVE_DESCRIPTION)
    return parser


# -- segment ------------------------------------------------------------------------------------
def request_from_args(args: argparse.Namespace):
    from volseg.cards import card_from_arguments, load_card
    from volseg.errors import ModelCardError
    from volseg.request import Overrides, SegmentRequest

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
    for name in ("overlap", "min_island_mm3"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} {value} is not a finite number")
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
                          probabilities=getattr(args, "probabilities", None), overwrite=args.overwrite, device=args.device,
                          trust_pickle=args.trust_pickle, overrides=overrides)


def _CancelOnSignal():  # noqa: N802 - kept as the name every command uses
    """SIGINT/SIGTERM (SIGBREAK on Windows) cancel the run at once: see :mod:`volseg.signals`.
    Yields the event the pipeline also checks between windows."""
    return signals.installed()


def _run_reported(reporter, fn) -> int:
    """Run ``fn``; report any failure as one error event (no traceback) and return the exit code.

    Set ``VOLSEG_DEBUG=1`` to get the traceback of an unexpected error instead.
    """
    try:
        fn()
        return 0
    except (KeyboardInterrupt, VolSegError, MemoryError) as exc:
        err = error_from_exception(exc)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for those who ask
        if os.environ.get("VOLSEG_DEBUG"):
            raise
        err = error_from_exception(exc)
    if signals.pending():  # a signal came during an import; whatever failed since, the run was cancelled
        err = Cancelled()
    reporter.error(err.message, err.hint, err.exit_code)
    return err.exit_code


def cmd_segment(args: argparse.Namespace) -> int:
    from volseg.progress import make_reporter
    from volseg.request import check_request

    reporter = make_reporter(args.progress)

    def run() -> None:
        request = request_from_args(args)
        check_request(request)  # refuse bad arguments before importing torch and MONAI (seconds)
        from volseg.pipeline import segment

        segment(request, reporter, cancel)

    with _CancelOnSignal() as cancel:
        return _run_reported(reporter, run)


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
        else:
            print(f"  weights: {where or 'the card names none; pass --checkpoint'}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from volseg.checkpoints.sniffing import checkpoint_kind

    checkpoint_kind(args.checkpoint)  # not a checkpoint at all: say so before importing torch
    from volseg.checkpoints.reading import describe, read_checkpoint

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
    from volseg.inference.devices import auto_device, list_devices

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
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    summary: dict = {}

    def run() -> None:
        from volseg.checkpoints.sniffing import checkpoint_kind
        from volseg.request import check_device_name, checkpoint_for

        template = request_from_args(args)
        cluster = cluster_from_args(args)
        check_device_name(template.device)  # refuse what needs no torch before importing it
        missing = next((p for p in args.inputs if not p.exists()), None)
        if missing is not None:
            raise InputError(f"{missing} does not exist")
        checkpoint_kind(checkpoint_for(template.card, template.checkpoint))
        from volseg.cohort.batch import run_batch

        summary.update(run_batch(template, list(args.inputs), args.output, args.format, reporter, cancel, cluster))
        reporter.log(f"batch: {len(summary['done'])} done, {len(summary['skipped'])} skipped, "
                     f"{len(summary['failed'])} failed; manifest {summary['manifest']}")

    with _CancelOnSignal() as cancel:
        rc = _run_reported(reporter, run)
    return rc or (1 if summary.get("failed") else 0)


# -- demo / serve ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from volseg.demo.run import run_demo
    from volseg.progress import make_reporter

    reporter = make_reporter(args.progress)
    with _CancelOnSignal() as cancel:
        return _run_reported(reporter, lambda: run_demo(args.output_dir, args.device, reporter, cancel,
                                                               overwrite=args.overwrite))


class _RequestParser(argparse.ArgumentParser):
    """The serve worker's argument parser: never prints and never exits.

    ``error``, ``exit`` and ``print_help``/``print_usage`` raise a :class:`VolSegError` with the
    text instead, so a bad request becomes one error event and stdout holds nothing but JSON.
    """

    def error(self, message: str):  # type: ignore[override]
        raise InputError(f"bad segment arguments: {message}", hint=self.format_usage().strip())

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise InputError(f"bad segment arguments: {(message or '').strip() or f'exit status {status}'}")

    def print_help(self, file=None) -> None:
        raise InputError("the worker does not run --help; the segment arguments are in the hint",
                         hint=self.format_help())

    def print_usage(self, file=None) -> None:
        raise InputError("the worker does not print usage", hint=self.format_usage().strip())


_EOF = object()  # end of stdin; never a message (JSON `null` parses to None, which is a bad request)


def _id_key(request_id: Any) -> str:
    """A hashable, type-exact key for a JSON request id (1 and "1" differ, lists are allowed)."""
    return json.dumps(request_id, sort_keys=True)


class _ServeQueue:
    """The worker's requests, in order, and the cancels that reach them.

    ``{"cancel": id}`` stops the running request when it has that id and marks a queued request
    with that id so it is skipped (reported as cancelled); ``{"cancel": true}`` or
    ``{"cancel": null}`` stops whatever runs. A cancel for an id that is neither running nor
    queued changes nothing.
    """

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}  # id key -> queued requests with that id
        self._cancelled: set[str] = set()
        self._running: str | None = None

    def put(self, msg: Any) -> None:
        with self._lock:
            if isinstance(msg, dict):
                key = _id_key(msg.get("id"))
                self._pending[key] = self._pending.get(key, 0) + 1
            self.messages.put(msg)

    def cancel(self, target: Any) -> None:
        with self._lock:
            if target is True or target is None:
                if self._running is not None:
                    self.cancel_event.set()
                return
            key = _id_key(target)
            if key == self._running:
                self.cancel_event.set()
            elif key in self._pending:
                self._cancelled.add(key)

    def next(self) -> tuple[Any, bool]:
        """The next message (``_EOF`` at the end) and whether it was cancelled while queued;
        a request that is not cancelled becomes the running one."""
        msg = self.messages.get()
        with self._lock:
            if not isinstance(msg, dict):
                return msg, False
            key = _id_key(msg.get("id"))
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
            if key in self._cancelled:
                if key not in self._pending:
                    self._cancelled.discard(key)
                return msg, True
            self.cancel_event.clear()
            self._running = key
            return msg, False

    def finished(self) -> None:
        with self._lock:
            self._running = None
            self.cancel_event.clear()

    def read(self, stream) -> None:
        """Feed the lines of ``stream`` (run in a thread): cancels act at once, the rest queue."""
        for line in stream:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                msg = {"invalid": line.strip()[:200]}
            if isinstance(msg, dict) and "cancel" in msg:
                self.cancel(msg["cancel"])
            else:
                self.put(msg)
        self.put(_EOF)


def _parse_request(parser: argparse.ArgumentParser, msg: Any) -> argparse.Namespace:
    if not isinstance(msg, dict) or not isinstance(msg.get("args"), list):
        shown = json.dumps(msg) if not isinstance(msg, dict) or "invalid" not in msg else msg["invalid"]
        raise InputError(f"bad request {shown[:200]}", hint='send {"id": ..., "args": ["in.nrrd", "--model", ...]}')
    return parser.parse_args([str(a) for a in msg["args"]])


def cmd_serve(_: argparse.Namespace, stdin=None, stdout=None) -> int:
    """Warm worker: each stdin line is ``{"id": ..., "args": [segment arguments]}`` or
    ``{"cancel": id}`` (``{"cancel": true}``: whatever runs now); answers are the JSON events of
    ``segment --progress json`` tagged with ``"request": id``, and nothing else goes to stdout.
    A request cancelled before it started is answered with one error event, exit code 130.
    The loaded model stays in memory between requests."""
    from volseg.pipeline import ModelCache, segment
    from volseg.progress import JsonReporter

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = _RequestParser(prog="volseg serve", add_help=True)
    _add_segment_options(parser)
    cache, requests = ModelCache(), _ServeQueue()
    threading.Thread(target=requests.read, args=(stdin,), daemon=True).start()
    while True:
        msg, cancelled = requests.next()
        if msg is _EOF:
            return 0
        reporter = JsonReporter(stdout, request=msg.get("id") if isinstance(msg, dict) else None)
        try:
            if cancelled:
                raise Cancelled("cancelled before it started; nothing was written")
            args = _parse_request(parser, msg)
        except VolSegError as err:
            reporter.error(err.message, err.hint, err.exit_code)
            requests.finished()
            continue
        def run(args: argparse.Namespace = args, reporter: JsonReporter = reporter) -> None:
            segment(request_from_args(args), reporter, requests.cancel_event, cache)

        try:
            _run_reported(reporter, run)
        finally:
            requests.finished()
        if signals.cancel_event.is_set():  # SIGINT/SIGTERM stop the worker, not only the request
            return 130


COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "models": cmd_models, "inspect": cmd_inspect, "devices": cmd_devices,
            "demo": cmd_demo, "serve": cmd_serve}


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

if __name__ == "__main__":
    sys.exit(main())
