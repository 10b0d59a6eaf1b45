"""What a bundle says about itself, read without torch: ``configs/metadata.json`` (inputs, labels,
name, version) and ``large_files.yml`` (where the weights are published).

This is what ``volseg models`` shows for a bundle folder in the cards folders, and the inputs and
labels of the card :func:`volseg.bundles.translate.bundle_card` makes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from volseg.bundles.source import Bundle, BundleError, read_text, shown_path

WEIGHT_FILES = ("models/model.pt", "models/model.ts")
_MODALITIES = {"ct": "CT", "mr": "MR", "mri": "MR", "pet": "PET", "us": "US"}


def card_id(name: str) -> str:
    """A card id from a bundle's folder name: ``spleen_ct_segmentation`` -> ``spleen-ct-segmentation``."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return slug or "bundle"


def _normal(name: str) -> str:
    return " ".join(re.sub(r"[_\s]+", " ", name.lower().replace("tumor", "tumour")).split())


@lru_cache(maxsize=1)
def known_labels() -> dict[str, dict[str, Any]]:
    """Colour and terminology of every label name the built-in cards describe (name normalised)."""
    from volseg.cards import builtin_cards_dirs

    known: dict[str, dict[str, Any]] = {}
    for folder in builtin_cards_dirs():
        for path in sorted(folder.glob("*.json")):
            try:
                card = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            for label in card.get("labels", []) if isinstance(card, dict) else []:
                if isinstance(label, dict) and label.get("terminology") and isinstance(label.get("name"), str):
                    entry = {"terminology": label["terminology"]}
                    if label.get("color"):
                        entry["color"] = label["color"]
                    known.setdefault(_normal(label["name"]), entry)
    return known


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise BundleError(f"{shown_path(path)} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise BundleError(f"{shown_path(path)} is nested too deeply") from None


def read_metadata(bundle: Bundle) -> dict[str, Any]:
    text = read_text(bundle.file("configs/metadata.json"))
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{bundle.where('configs/metadata.json')} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise BundleError(f"{bundle.where('configs/metadata.json')} is nested too deeply") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{bundle.where('configs/metadata.json')} does not hold a mapping")
    return meta


def weights_url(bundle: Bundle, relative: str = "models/model.pt") -> str | None:
    """Where ``large_files.yml`` (or ``.yaml``) says the file ``relative`` is published."""
    for name in ("large_files.yml", "large_files.yaml"):
        path = bundle.file(name, required=False)
        if path is None:
            continue
        data = _read_yaml(path)
        items = data.get("large_files", []) if isinstance(data, dict) else []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and str(item.get("path", "")).lstrip("./") == relative and item.get("url"):
                return str(item["url"])
    return None


def weights_file(bundle: Bundle) -> Path | None:
    """models/model.pt, else models/model.ts (checked, bounded), else None."""
    from volseg.bundles.source import MAX_WEIGHTS_BYTES

    for relative in WEIGHT_FILES:
        path = bundle.file(relative, limit=MAX_WEIGHTS_BYTES, required=False)
        if path is not None:
            return path
    return None


@dataclass(frozen=True)
class BundleFormat:
    """The card fields metadata.json gives: inputs, labels, modality, title."""

    title: str
    version: str
    description: str
    license: str | None
    modality: str | None
    inputs: list[dict[str, Any]]
    channel_names: dict[int, str]
    out_channels: int | None


def _section(meta: dict[str, Any], which: str, source: str) -> dict[str, Any]:
    fmt = meta.get("network_data_format")
    part = fmt.get(which) if isinstance(fmt, dict) else None
    if not isinstance(part, dict) or not part or not all(isinstance(v, dict) for v in part.values()):
        raise BundleError(f"{source}: network_data_format#{which} is missing or not a mapping",
                          hint="a MONAI bundle's metadata.json describes its inputs and outputs there")
    return next(iter(part.values()))


def read_format(bundle: Bundle) -> BundleFormat:
    meta = read_metadata(bundle)
    source = bundle.where("configs/metadata.json")
    image = _section(meta, "inputs", source)
    pred = _section(meta, "outputs", source)
    modality = _MODALITIES.get(str(image.get("modality", "")).lower())
    channel_def = image.get("channel_def") or {}
    n_in = int(image.get("num_channels", len(channel_def) or 1))
    inputs = []
    for c in range(n_in):
        name = str(channel_def.get(str(c), "")) if isinstance(channel_def, dict) else ""
        if n_in == 1 and name.lower() in ("", "image"):
            name = modality or "image"
        entry: dict[str, Any] = {"name": name or f"channel {c}"}
        if modality:
            entry["modality"] = modality
        if n_in > 1 and name:
            entry["name_hint"] = re.escape(name)
        inputs.append(entry)
    names = pred.get("channel_def") or {}
    channel_names = {int(k): str(v) for k, v in names.items() if str(k).isdigit()} if isinstance(names, dict) else {}
    out = pred.get("num_channels")
    return BundleFormat(
        title=str(meta.get("name") or bundle.name),
        version=str(meta.get("version", "")),
        description=str(meta.get("description", "")),
        license=str(meta["license"]) if isinstance(meta.get("license"), str) else None,
        modality=modality,
        inputs=inputs,
        channel_names=channel_names,
        out_channels=int(out) if isinstance(out, int) else None,
    )


def card_labels(fmt: BundleFormat, activation: str) -> list[dict[str, Any]]:
    """The card's labels from the output channel names: softmax labels are the channels but the
    background (value = channel); sigmoid labels one per channel (value = channel + 1)."""
    labels = []
    for channel in sorted(fmt.channel_names):
        name = fmt.channel_names[channel].strip() or f"channel {channel}"
        if activation == "softmax" and (channel == 0 or name.lower() == "background"):
            continue
        label: dict[str, Any] = {"value": channel if activation == "softmax" else channel + 1,
                                 "name": name.replace("_", " "), "channel": channel}
        label.update(known_labels().get(_normal(name), {}))
        labels.append(label)
    return labels


def bundle_summary(path: Path) -> dict[str, Any]:
    """``volseg models`` for a bundle folder, without torch or the inference config's translation:
    what it expects, its labels, and whether its weights are there (else where they are published)."""
    from volseg.bundles.source import open_bundle

    bundle = open_bundle(path)
    fmt = read_format(bundle)
    weights = weights_file(bundle)
    url = weights_url(bundle)
    labels = card_labels(fmt, "softmax" if 0 in fmt.channel_names and fmt.channel_names[0].lower() == "background"
                         else "sigmoid")
    from volseg.cards import DEFAULT_COLORS

    return {
        "id": card_id(bundle.name),
        "title": f"{fmt.title} (MONAI bundle {fmt.version})".replace(" ()", ""),
        "description": fmt.description,
        "architecture": "monai-bundle",
        "modality": fmt.modality,
        "inputs": [{"name": i["name"], "modality": i.get("modality"), "name_hint": i.get("name_hint")} for i in fmt.inputs],
        "labels": [{"value": lab["value"], "name": lab["name"],
                    "color": list(lab.get("color") or DEFAULT_COLORS[n % len(DEFAULT_COLORS)]),
                    "terminology": lab.get("terminology")} for n, lab in enumerate(labels)],
        "checkpoint": {"path": str(weights) if weights else None, "sha256": None, "published_at": url},
        "timing": {},
        "demonstration": False,
        "card_path": str(bundle.origin),
        "bundle": {"path": str(bundle.origin), "weights": "present" if weights else "missing", "download": url},
    }
