"""A MONAI bundle translated into a volseg model card.

Read, in the order a volume takes through the bundle's ``inference`` config:

* ``network_def``: one of MONAI's networks volseg builds (:data:`volseg.bundles.reading.NETWORKS`), its arguments
  literal values checked against the constructor; a 2D network, a network of the bundle's own
  ``scripts/`` or a network needing Python expressions is refused by name.
* ``preprocessing``: each dictionary transform becomes the card step of its array transform
  (``Spacingd`` -> ``Spacing``), with the dictionary-only arguments dropped; loading and typing
  steps are what volseg's reader does already.
* ``inferer``: ``SlidingWindowInferer``'s window, overlap, batch, blending and padding;
  ``SimpleInferer`` as one whole-volume pass (``inference.whole_volume``, with the sizes the network
  takes as ``inference.size_multiple``).
* ``postprocessing``: ``Activationsd`` (softmax / sigmoid), ``AsDiscreted`` (argmax /
  threshold) after ``Invertd`` (the probabilities mapped back to the input grid), or an argmax
  before ``Invertd(nearest_interp=True)`` (``postprocessing.invert: "labels_nearest"``: the label
  map mapped back nearest-neighbour), ``KeepLargestConnectedComponentd`` and ``FillHolesd`` on the
  input grid; ``SaveImaged`` is volseg's writer.

Simple ``$`` expressions (literals, ``@references``, ``x if c else y``, ...) are read as data by
:mod:`volseg.bundles.safe_expression`, without running anything; other expressions need trust.

Each section is read by :class:`volseg.bundles.reading.SectionReader`. Anything else is one
:class:`~volseg.bundles.source.BundleError` naming the config key and
what to do. The inputs and labels come from ``metadata.json``
(:mod:`volseg.bundles.metadata`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volseg.bundles.config import BundleConfig
from volseg.bundles.metadata import card_id, card_labels, read_format, weights_file, weights_url
from volseg.bundles.reading import _RESAMPLING, SectionReader
from volseg.bundles.source import MAX_WEIGHTS_BYTES, Bundle, BundleError, open_bundle


@dataclass
class Translation:
    """The card (JSON, as a card file holds it) and what the reader noted on the way."""

    card: dict[str, Any]
    bundle: Bundle
    notes: list[str] = field(default_factory=list)
    code_to_run: list[str] = field(default_factory=list)


def translate(bundle: Bundle, trust: bool = False, announce=None) -> Translation:
    """The card for ``bundle`` (see the module's docstring).

    ``trust`` evaluates the bundle's expressions that the card needs; ``announce`` is called with
    each (``["key: text"]``) before it runs."""
    config = BundleConfig(bundle, trust=trust)
    reader = SectionReader(config, announce)
    torchscript = bundle.file("models/model.ts", limit=MAX_WEIGHTS_BYTES, required=False)
    try:
        arch, args, net_name = reader.network()
    except BundleError as error:  # a network volseg does not build: the bundle's TorchScript export runs instead
        if torchscript is None or getattr(error, "key", "") == "network_def#spatial_dims":
            raise
        arch, args, net_name = "torchscript", {}, "TorchScript models/model.ts"
        reader.notes.append(f"{error.message.split(': ', 1)[-1]}; running models/model.ts (TorchScript) instead")
    steps = reader.preprocessing()
    has_resampling = any(s["name"] in _RESAMPLING for s in steps)
    inference = reader.inferer()
    post = reader.postprocessing(has_resampling)
    fmt = read_format(bundle)
    out_channels = args.get("out_channels", args.get("num_classes"))
    if arch.startswith("bundle-") or arch == "torchscript":  # sizes not in network_def: metadata's
        out_channels = fmt.out_channels
    if fmt.out_channels is not None and out_channels is not None and fmt.out_channels != out_channels:
        raise BundleError(f"{config.source}: network_def#out_channels is {out_channels} but metadata.json's output "
                          f"has {fmt.out_channels} channels", hint="the bundle contradicts itself; fix one of them")
    in_channels = args.get("in_channels")
    if in_channels is not None and in_channels != len(fmt.inputs):
        raise BundleError(f"{config.source}: network_def#in_channels is {in_channels} but metadata.json describes "
                          f"{len(fmt.inputs)} input channels", hint="the bundle contradicts itself; fix one of them")
    activation = post.pop("activation")
    labels = card_labels(fmt, activation)
    if "channel_labels" in post:  # painted in card order, later on top: the lambda's first pair last
        by_channel = {lab["channel"]: lab for lab in labels}
        labels = [{**by_channel[c], "value": v} for c, v in reversed(post.pop("channel_labels")) if c in by_channel]
    if not labels:
        raise BundleError(f"{bundle.name}/configs/metadata.json names no output channel but the background",
                          hint="network_data_format#outputs#...#channel_def names each output channel")
    weights = torchscript if arch == "torchscript" else weights_file(bundle)
    url = weights_url(bundle, "models/model.ts" if arch == "torchscript" else "models/model.pt")
    checkpoint: dict[str, Any] = {}
    if weights is not None:
        checkpoint["path"] = str(weights)
        if weights.suffix == ".ts":
            arch, args = "torchscript", {}
    if url:
        checkpoint["published_at"] = url
    card: dict[str, Any] = {
        "id": card_id(bundle.name),
        "title": f"{fmt.title} (MONAI bundle {fmt.version})".replace(" ()", ""),
        "description": (fmt.description + " " if fmt.description else "") + f"Translated by volseg from the MONAI "
        f"bundle {bundle.name} ({net_name}).",
        "architecture": {"name": arch, "config": args} if arch != "torchscript" else {"name": "torchscript"},
        "inputs": fmt.inputs,
        "labels": labels,
        "output": {"activation": activation, "channels": int(out_channels or fmt.out_channels or 1)},
        "preprocessing": steps,
        "inference": inference,
    }
    multiple = size_multiple(arch, args)
    if inference.get("whole_volume") and multiple > 1:
        card["inference"]["size_multiple"] = multiple
    if fmt.version:
        card["version"] = fmt.version
    if fmt.license:
        card["license"] = fmt.license
    if fmt.modality:
        card["modality"] = fmt.modality
    if "threshold" in post:
        card["output"]["threshold"] = post.pop("threshold")
    if post:
        card["postprocessing"] = post
    if checkpoint:
        card["checkpoint"] = checkpoint
    amp = config.raw.get("amp", config.raw.get("evaluator", {}).get("amp") if isinstance(config.raw.get("evaluator"), dict) else None)
    if isinstance(amp, bool):
        card["inference"]["amp"] = amp
    from volseg.cards import validate

    validate(card, f"the card translated from {bundle.name}")
    return Translation(card, bundle, reader.notes, reader.code_run)


def size_multiple(arch: str, args: dict[str, Any]) -> int:
    """What each input size must be a multiple of for ``arch`` built with ``args`` (1: unknown or any):
    a UNet's product of strides, a SegResNet's 2 per down level."""
    import math

    try:
        if arch == "unet":
            strides = args.get("strides", [])
            return int(math.prod(int(s) if isinstance(s, int) else max(int(v) for v in s) for s in strides))
        if arch == "segresnet":
            return 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)
    except (TypeError, ValueError):
        return 1
    return 1


def bundle_card(path: str | Path, trust: bool = False, announce=None):
    """(:class:`~volseg.cards.ModelCard`, :class:`Translation`) for the bundle at ``path`` (folder or zip)."""
    from volseg.cards import parse_card

    translation = translate(open_bundle(path), trust, announce)
    return parse_card(translation.card), translation
