"""``volseg models``, ``volseg inspect`` and ``volseg devices``: what there is to run, and on what."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    if getattr(args, "server", None):  # the models a volseg server offers
        from volseg.server.client import client_from_args

        answer = client_from_args(args).models()
        if args.json:
            print(json.dumps(answer, indent=1))
        else:
            for m in answer["models"]:
                present = "checkpoint present" if m["checkpoint"]["present"] else "no checkpoint"
                print(f"{m['id']}\n  {m['title']}\n  architecture {m['architecture']}; {present}")
        return 0
    from volseg.bundles.catalogue import list_bundles, print_bundle

    if args.bundle:
        from volseg.bundles.metadata import bundle_summary

        summary = bundle_summary(args.bundle)
        print(json.dumps(summary, indent=1) if args.json else print_bundle(summary))
        return 0
    cards, problems = list_cards(args.cards_dir)
    bundles, bundle_problems = list_bundles(args.cards_dir)
    problems += bundle_problems
    for p in problems:
        print(f"warning: skipped: {p}", file=sys.stderr)
    if args.json:
        print(json.dumps({"models": [c.summary() for c in cards] + bundles, "problems": problems}, indent=1))
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
        notes = c.raw.get("checkpoint", {}).get("notes")
        if notes:  # which file of a download to use, or how to make one (a card may say "see the notes")
            print(f"  notes: {notes}")
    for b in bundles:
        print(print_bundle(b))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from volseg.checkpoints.sniffing import checkpoint_kind

    checkpoint_kind(args.checkpoint)  # not a checkpoint at all: say so before importing torch
    from volseg.checkpoints.reading import describe, read_checkpoint

    info = describe(read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle))
    info["cards"] = cards_for(Path(info["path"]))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"{info['path']}\n  format: {info['format']}" + (f" (weights under {'/'.join(info['wrapper'])})" if info["wrapper"] else ""))
    if info["stripped_prefixes"]:
        print(f"  stripped key prefixes: {' '.join(info['stripped_prefixes'])}")
    print(f"  {info['n_keys']} tensors, {info['n_params']:,} parameters")
    for card_id in info["cards"]:
        print(f"  model card {card_id!r} was written for this file (same sha256): volseg segment IMAGE --model {card_id}")
    if not info["matches"]:
        print("  fits no registered architecture exactly; first keys: " + ", ".join(info.get("first_keys", [])))
        return 0
    for m in info["matches"]:
        print(f"  fits {m['architecture']}: {m['variant']}\n    config read from the weights {json.dumps(m['config'])}")
        for name, what in m.get("not_in_weights", {}).items():
            print(f"    {name}: {what}")
    return 0


def cards_for(checkpoint: Path) -> list[str]:
    """The ids of the cards (built-in and $VOLSEG_CARDS_PATH) whose checkpoint SHA-256 is this file's:
    the settings the weights cannot show are in them."""
    from volseg.cards import list_cards
    from volseg.checkpoints.reading import sha256sum

    cards, _ = list_cards()
    pinned = [c for c in cards if c.checkpoint_sha256]
    if not pinned or not checkpoint.is_file():
        return []
    digest = sha256sum(checkpoint).lower()
    return [c.id for c in pinned if c.checkpoint_sha256.lower() == digest]


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
