"""``volseg bundle-card`` and ``--bundle``: a MONAI bundle as a model card."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _say(reporter, text: str, level: str = "info") -> None:
    if reporter is not None:
        reporter.log(text, level)
    else:
        print(("warning: " if level == "warning" else "") + text, file=sys.stderr)


def card_from_bundle(path: Path, trust: bool, reporter=None, checkpoint: Path | None = None, digest: str | None = None):
    """The bundle's card; says what was dropped and, trusted, which of the bundle's code runs.
    ``digest``: the bundle's configs and scripts must still be those (``--bundle-sha256``)."""
    from volseg.bundles.source import BundleError, bundle_digest, open_bundle
    from volseg.bundles.translate import translate
    from volseg.cards import parse_card

    bundle = open_bundle(path)
    if digest is not None:
        found = bundle_digest(bundle)
        if found != digest:
            raise BundleError(f"the bundle {path} has changed since it was trusted (its configs or scripts are not "
                              "the ones trusted)", hint="check what changed and trust it again "
                              f"(`volseg bundle-code {path}` lists its code); nothing of it ran")
    translation = translate(bundle, trust, announce=lambda code: _say(
        reporter, "--trust-bundle-code: running the bundle's code: " + "; ".join(code), "warning"))
    card = parse_card(translation.card)
    for note in translation.notes:
        _say(reporter, note)
    if card.checkpoint_path is None and checkpoint is None:
        from volseg.errors import CheckpointError

        where = card.raw.get("checkpoint", {}).get("published_at")
        raise CheckpointError(f"the bundle {path} has no weights (models/model.pt or models/model.ts)",
                              hint=(f"download {where} into {Path(path) / 'models' / 'model.pt'}" if where
                                    else "put the weights in models/model.pt") + ", or pass --checkpoint FILE")
    return card


def cmd_bundle_code(args: argparse.Namespace) -> int:
    """``volseg bundle-code BUNDLE [--json]``: :func:`volseg.bundles.trust.code_report`."""
    from volseg.bundles.trust import code_report

    report = code_report(args.bundle)
    if args.json:
        print(json.dumps(report, indent=1))
    elif not report["needs_trust"]:
        print(f"{args.bundle} runs without --trust-bundle-code: none of its own code runs")
    else:
        print(f"{args.bundle} runs only with --trust-bundle-code, which may run this code of the bundle's own:")
        for line in report["code"]:
            print(f"  {line}")
        print(f"digest: {report['digest']} (pass --bundle-sha256 {report['digest']} to run only this version)")
    return 0


def cmd_bundle_card(args: argparse.Namespace) -> int:
    from volseg.bundles.translate import translate
    from volseg.bundles.source import open_bundle
    from volseg.errors import ModelCardError, OutputError
    from volseg.io.atomic import atomic_output

    if args.output.suffix.lower() != ".json":
        raise OutputError(f"{args.output} is not a .json file", hint="a model card is a .json file")
    if args.output.exists() and not args.overwrite:
        raise OutputError(f"{args.output} exists", hint="pass --overwrite to replace it, or choose another name")
    translation = translate(open_bundle(args.bundle), args.trust_bundle_code,
                            announce=lambda code: _say(None, "--trust-bundle-code: running the bundle's code: " + "; ".join(code), "warning"))
    card = dict(translation.card)
    if card["architecture"]["name"].startswith("bundle-"):
        raise ModelCardError(f"the network of {args.bundle} is built by the bundle's own code, which a card file cannot hold",
                             hint=f"run it with `volseg segment IMAGE --bundle {args.bundle} --trust-bundle-code -o OUT`, "
                             "or export models/model.ts (TorchScript) and write the card again")
    if args.bundle.suffix.lower() == ".zip" and "checkpoint" in card:
        card["checkpoint"] = {k: v for k, v in card["checkpoint"].items() if k != "path"}  # inside a temporary copy
    for note in translation.notes:
        _say(None, note)
    with atomic_output(args.output, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    n = len(card['labels'])
    print(f"wrote {args.output} (model {card['id']}: {n} label{'' if n == 1 else 's'})")
    return 0
