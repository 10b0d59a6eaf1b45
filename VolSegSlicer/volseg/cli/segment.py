"""``volseg segment``: one volume (or one set of channels) with one model."""

from __future__ import annotations

import argparse
import math

from volseg.cli.running import cancel_on_signal, run_reported
from volseg.errors import InputError, VolSegError


#: The largest sliding-window side accepted (published windows are 64-160 voxels).
MAX_ROI = 1024


def request_from_args(args: argparse.Namespace, reporter=None):
    from volseg.cards import card_from_arguments, load_card
    from volseg.errors import ModelCardError
    from volseg.request import Overrides, SegmentRequest

    bundle = getattr(args, "bundle", None)
    if sum(bool(x) for x in (args.model, args.arch, bundle)) > 1:
        raise ModelCardError("give one of --model, --arch and --bundle")
    if getattr(args, "trust_bundle_code", False) and not bundle:
        raise ModelCardError("--trust-bundle-code goes with --bundle")
    if getattr(args, "bundle_sha256", None) and not getattr(args, "trust_bundle_code", False):
        raise ModelCardError("--bundle-sha256 goes with --bundle and --trust-bundle-code")
    if (args.model or bundle) and getattr(args, "activation", None):
        raise ModelCardError("--activation is for --arch runs: a card states its own (output.activation)")
    if bundle:
        from volseg.cli.bundle import card_from_bundle

        card = card_from_bundle(bundle, args.trust_bundle_code, reporter, args.checkpoint,
                                getattr(args, "bundle_sha256", None))
    elif args.model:
        card = load_card(args.model, args.cards_dir)
    elif args.arch:
        if not args.num_labels or args.num_labels < 1:
            raise ModelCardError("--arch needs --num-labels N (the number of foreground labels)")
        card = card_from_arguments(args.arch, args.num_labels, in_channels=len(args.inputs), config=args.arch_config,
                                   activation=args.activation)
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
    if args.roi_size is not None and max(args.roi_size) > MAX_ROI:
        raise InputError(f"--roi-size {' '.join(map(str, args.roi_size))} is larger than any network window "
                         f"(at most {MAX_ROI} voxels per axis)",
                         hint="give the window the network was trained with (the card's inference.roi_size), "
                         "e.g. --roi-size 96 96 96")
    overrides = Overrides(
        roi_size=tuple(args.roi_size) if args.roi_size else None, overlap=args.overlap,
        sw_batch_size=args.sw_batch_size, flips=args.flips, amp=args.amp,
        precision=getattr(args, "precision", None), keep_largest=args.keep_largest,
        fill_holes=args.fill_holes, min_island_mm3=args.min_island_mm3)
    return SegmentRequest(inputs=args.inputs, card=card, output=args.output, checkpoint=args.checkpoint,
                          probabilities=getattr(args, "probabilities", None), overwrite=args.overwrite, device=args.device,
                          trust_pickle=args.trust_pickle, overrides=overrides)


def cmd_segment(args: argparse.Namespace) -> int:
    from volseg.progress import make_reporter
    from volseg.request import check_request

    reporter = make_reporter(args.progress)

    def run() -> None:
        if getattr(args, "server", None):  # run on a volseg server (volseg.server.client)
            from volseg.server.client import segment_remote

            segment_remote(args, reporter, cancel)
            return
        request = request_from_args(args, reporter)
        check_request(request)  # refuse bad arguments before importing torch and MONAI (seconds)
        from volseg.pipeline import segment

        segment(request, reporter, cancel)

    with cancel_on_signal() as cancel:
        return run_reported(reporter, run)
