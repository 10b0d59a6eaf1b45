"""Model cards: everything needed to run a segmentation model correctly.

A card is a JSON file validated against ``schema/model_card.schema.json``. Built-in cards live
in the repository's ``Resources/ModelCards/`` (copied into the wheel as
``volseg/resources/ModelCards``); users add their own folders with ``--cards-dir`` or the
``VOLSEG_CARDS_PATH`` environment variable (``os.pathsep``-separated), or point at a card file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from volseg.errors import ModelCardError
from volseg.options import InferenceOptions

SCHEMA_PATH = Path(__file__).parent / "schema" / "model_card.schema.json"
CARDS_ENV = "VOLSEG_CARDS_PATH"
#: The id suffix of a card made from ``--arch NAME --num-labels N`` (:func:`card_from_arguments`).
ADHOC_SUFFIX = "-adhoc"

#: A distinguishable default palette for labels without a colour (Slicer's GenericAnatomyColors-like).
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
    (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49),
    (0, 151, 206), (216, 101, 79), (183, 156, 220), (183, 214, 211), (152, 189, 207),
)


@dataclass(frozen=True)
class Label:
    """One output label: the value in the label map and how to show and code it."""

    value: int
    name: str
    color: tuple[int, int, int]
    channel: int
    terminology: dict[str, list[str]] | None = None


@dataclass(frozen=True)
class InputSpec:
    """One input channel of the network."""

    name: str
    modality: str | None = None
    name_hint: str | None = None


@dataclass(frozen=True)
class PostprocessSettings:
    keep_largest_component: bool | tuple[int, ...] = False
    fill_holes: bool | tuple[int, ...] = False
    min_island_mm3: float = 0.0


@dataclass(frozen=True)
class ModelCard:
    """A validated model card. ``raw`` keeps the JSON as read."""

    id: str
    title: str
    path: Path | None
    raw: dict[str, Any]
    architecture: str
    config: dict[str, Any]
    inputs: tuple[InputSpec, ...]
    labels: tuple[Label, ...]
    activation: str
    threshold: float
    out_channels: int
    preprocessing: tuple[dict[str, Any], ...]
    inference: InferenceOptions
    postprocessing: PostprocessSettings
    checkpoint_path: Path | None = None
    checkpoint_sha256: str | None = None
    demonstration: bool = False
    description: str = ""
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_torchscript(self) -> bool:
        return self.architecture == "torchscript"

    @property
    def from_arguments(self) -> bool:
        """Whether this card was made by :func:`card_from_arguments` (``--arch``, no card file)."""
        return self.path is None and self.id.endswith(ADHOC_SUFFIX)

    def channel_names(self) -> list[str]:
        """The name of each output channel of the network, in channel order: the label that
        reads it, ``background`` for a softmax channel no label uses first, else ``channel N``
        (what ``--probabilities`` files record for each of their channels)."""
        names = [f"channel {c}" for c in range(self.out_channels)]
        for lab in self.labels:
            names[lab.channel] = lab.name
        if self.activation == "softmax" and self.out_channels and all(lab.channel for lab in self.labels):
            names[0] = "background"
        return names

    def summary(self) -> dict[str, Any]:
        """The JSON the CLI prints for ``volseg models --json``."""
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "architecture": self.architecture,
            "modality": self.modality,
            "inputs": [{"name": i.name, "modality": i.modality, "name_hint": i.name_hint} for i in self.inputs],
            "labels": [
                {"value": lab.value, "name": lab.name, "color": list(lab.color), "terminology": lab.terminology}
                for lab in self.labels
            ],
            "checkpoint": {
                "path": str(self.checkpoint_path) if self.checkpoint_path else None,
                "sha256": self.checkpoint_sha256,
                "published_at": self.raw.get("checkpoint", {}).get("published_at"),
            },
            "timing": self.raw.get("timing", {}),
            "demonstration": self.demonstration,
            "card_path": str(self.path) if self.path else None,
        }


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(schema)


def _error_path(error) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top level)"


def validate(raw: Any, source: str = "card") -> None:
    """Validate ``raw`` against the schema; raise :class:`ModelCardError` listing every problem."""
    errors = sorted(_validator().iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        problems = []
        for e in errors[:8]:
            msg = e.message
            if e.validator == "additionalProperties":
                allowed = sorted(e.schema.get("properties", {}))
                msg += f" (allowed: {', '.join(allowed)})"
            problems.append(f"  at {_error_path(e)}: {msg}")
        raise ModelCardError(
            f"{source} is not a valid model card:\n" + "\n".join(problems),
            hint=f"see the schema in {SCHEMA_PATH}",
        )


def builtin_cards_dirs() -> list[Path]:
    """Folders holding the built-in cards: the installed copy and the source checkout's Resources."""
    here = Path(__file__).resolve().parent
    candidates = [
        here / "resources" / "ModelCards",  # wheel install
        here.parent.parent / "Resources" / "ModelCards",  # source checkout / editable install
        here.parent / "Resources" / "ModelCards",  # Slicer extension build (module dir)
    ]
    return [c for c in candidates if c.is_dir()]


def cards_dirs(extra: Iterable[str | Path] | None = None) -> list[Path]:
    """The folders searched for cards, in priority order: ``extra``, ``$VOLSEG_CARDS_PATH``, built-in."""
    dirs = [Path(d).expanduser() for d in (extra or [])]
    env = os.environ.get(CARDS_ENV, "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    for d in dirs:
        if not d.is_dir():
            raise ModelCardError(f"cards folder {d} does not exist", hint="check --cards-dir or $VOLSEG_CARDS_PATH")
    return dirs + builtin_cards_dirs()


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelCardError(f"cannot read model card {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelCardError(
            f"model card {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def parse_card(raw: dict[str, Any], path: Path | None = None) -> ModelCard:
    """Validate and interpret a card's JSON."""
    source = str(path) if path else "card"
    validate(raw, source)
    arch = raw.get("architecture", {"name": "torchscript"})
    output = raw.get("output", {})
    activation = output.get("activation", "softmax")
    labels = _parse_labels(raw["labels"], source, activation)
    out_channels = int(output.get("channels", max(lab.channel for lab in labels) + 1))
    too_high = [lab.name for lab in labels if lab.channel >= out_channels]
    if too_high:
        raise ModelCardError(
            f"{source}: labels {too_high} use output channels beyond the {out_channels} the network has",
            hint="fix the label 'channel'/'value' entries or output.channels",
        )
    _check_architecture(arch["name"], source)
    inf = raw.get("inference", {})
    post = raw.get("postprocessing", {})
    ckpt = raw.get("checkpoint", {})
    ckpt_path = None
    if ckpt.get("path"):
        p = Path(ckpt["path"]).expanduser()
        ckpt_path = p if p.is_absolute() or path is None else (path.parent / p).resolve()
    return ModelCard(
        id=raw["id"],
        title=raw["title"],
        path=path,
        raw=raw,
        architecture=arch["name"].lower(),
        config=dict(arch.get("config", {})),
        inputs=tuple(InputSpec(i["name"], i.get("modality"), i.get("name_hint")) for i in raw["inputs"]),
        labels=labels,
        activation=activation,
        threshold=float(output.get("threshold", 0.5)),
        out_channels=out_channels,
        preprocessing=tuple(raw.get("preprocessing", [])),
        inference=InferenceOptions(
            roi_size=tuple(inf.get("roi_size", (96, 96, 96))),
            overlap=float(inf.get("overlap", 0.5)),
            mode=inf.get("mode", "constant"),
            sigma_scale=float(inf.get("sigma_scale", 0.125)),
            sw_batch_size=int(inf.get("sw_batch_size", 1)),
            flips=tuple(tuple(f) for f in inf.get("flips", [])),
            amp=bool(inf.get("amp", True)),
            runtime=inf.get("runtime", "auto"),
            precision=inf.get("precision", "auto"),
            cudnn_benchmark=bool(inf.get("cudnn_benchmark", True)),
            channels_last=bool(inf.get("channels_last", False)),
            activation=activation,
            activation_per_window=bool(inf.get("activation_per_window", False)),
            padding_mode=inf.get("padding_mode", "constant"),
            select_output=int(output.get("select", 0)),
            out_channels=out_channels,
        ),
        postprocessing=PostprocessSettings(
            keep_largest_component=_bool_or_labels(post.get("keep_largest_component", False)),
            fill_holes=_bool_or_labels(post.get("fill_holes", False)),
            min_island_mm3=float(post.get("min_island_mm3", 0.0)),
        ),
        checkpoint_path=ckpt_path,
        checkpoint_sha256=ckpt.get("sha256"),
        demonstration=bool(raw.get("demonstration", False)),
        description=raw.get("description", ""),
        modality=raw.get("modality"),
    )


def _check_architecture(name: str, source: str) -> None:
    """Refuse an unknown architecture name (read without importing torch)."""
    from volseg.models.builtin import known_names

    known = known_names()
    if name.lower() != "torchscript" and name.lower() not in known:
        import difflib

        close = difflib.get_close_matches(name.lower(), known, n=2)
        raise ModelCardError(
            f"{source}: unknown architecture {name!r}",
            hint=(f"did you mean {' or '.join(close)}? " if close else "") + "known: torchscript, " + ", ".join(known),
        )


def _bool_or_labels(v: bool | list[int]) -> bool | tuple[int, ...]:
    return tuple(v) if isinstance(v, list) else bool(v)


def _parse_labels(items: list[dict[str, Any]], source: str, activation: str) -> tuple[Label, ...]:
    """Labels in card order. A label's output channel defaults to its value for softmax outputs
    (channel 0 is background) and to its position for sigmoid outputs (no background channel)."""
    values = [i["value"] for i in items]
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ModelCardError(f"{source}: label values {dupes} appear more than once", hint="each label needs its own value")
    labels = []
    for n, item in enumerate(items):
        color = tuple(item.get("color") or DEFAULT_COLORS[n % len(DEFAULT_COLORS)])
        labels.append(
            Label(
                value=int(item["value"]),
                name=item["name"],
                color=color,  # type: ignore[arg-type]
                channel=int(item.get("channel", item["value"] if activation == "softmax" else n)),
                terminology=item.get("terminology"),
            )
        )
    return tuple(labels)


def match_inputs(hints: Sequence[str | None], names: Sequence[str]) -> list[int | None]:
    """For each input's name hint (a case-insensitive regular expression), the index in ``names``
    of the first name it matches that no earlier input took; None where nothing matches.

    A single input without a match takes the first name. Used to pre-fill the Slicer panel's
    input selectors and to pick each channel's file in ``volseg batch`` case folders.
    """
    taken: set[int] = set()
    chosen: list[int | None] = []
    for hint in hints:
        pick = None
        if hint:
            try:
                pattern = re.compile(hint, re.IGNORECASE)
            except re.error:
                pattern = None
            if pattern is not None:
                pick = next((i for i, n in enumerate(names) if i not in taken and pattern.search(n)), None)
        if pick is not None:
            taken.add(pick)
        chosen.append(pick)
    if len(hints) == 1 and chosen[0] is None and names:
        chosen[0] = 0
    return chosen


def load_card(ref: str | Path, cards_dirs_: Sequence[str | Path] | None = None) -> ModelCard:
    """Load a card by id (searched in :func:`cards_dirs`) or by path to a ``.json`` file."""
    p = Path(ref).expanduser()
    if p.suffix.lower() == ".json" or p.is_file():
        if not p.is_file():
            raise ModelCardError(f"model card file {p} does not exist")
        return parse_card(_read_json(p), p.resolve())
    known = _index(cards_dirs(cards_dirs_))
    if str(ref) in known:
        path = known[str(ref)]
        return parse_card(_read_json(path), path)
    import difflib

    close = difflib.get_close_matches(str(ref), list(known), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run `volseg models` to list the cards"
    raise ModelCardError(f"unknown model {str(ref)!r}", hint=hint)


def _index(dirs: Sequence[Path]) -> dict[str, Path]:
    """Card id -> path; earlier folders win (a user's card shadows a built-in one)."""
    index: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            try:
                card_id = _read_json(path).get("id")
            except (ModelCardError, AttributeError):
                continue
            if isinstance(card_id, str):
                index.setdefault(card_id, path)
    return index


def list_cards(cards_dirs_: Sequence[str | Path] | None = None) -> tuple[list[ModelCard], list[str]]:
    """All cards found, and a message for each card file that is invalid (shown, not fatal)."""
    cards, problems = [], []
    for card_id, path in sorted(_index(cards_dirs(cards_dirs_)).items()):
        try:
            cards.append(parse_card(_read_json(path), path))
        except ModelCardError as exc:
            problems.append(f"{path}: {exc.message}")
    return cards, problems


def card_from_arguments(architecture: str, num_labels: int, in_channels: int = 1,
                        config: dict[str, Any] | None = None) -> ModelCard:
    """A minimal card for a checkpoint without one (``--arch NAME --num-labels N``).

    The output activation is the architecture family's (softmax with a background channel for
    most, sigmoid without one for SegFormer3D); TorchScript is taken as softmax.
    """
    from volseg.models.builtin import output_kind

    _check_architecture(architecture, "--arch")
    activation = "softmax" if architecture.lower() == "torchscript" else output_kind(architecture)
    if activation is None:  # a registered plug-in (the registry is imported already if there is one)
        from volseg.models.registry import get

        activation = get(architecture).output_kind
    raw = {
        "id": f"{architecture}{ADHOC_SUFFIX}",
        "title": f"{architecture} ({num_labels} labels, no model card)",
        "architecture": {"name": architecture, "config": config or {}},
        "inputs": [{"name": f"input {i}"} for i in range(in_channels)],
        "labels": [{"value": v, "name": f"Label {v}"} for v in range(1, num_labels + 1)],
        "output": {"activation": activation},
    }
    return parse_card(raw)
