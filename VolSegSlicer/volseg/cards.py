"""Model cards: everything needed to run a segmentation model correctly.

A card is a JSON file validated against ``schema/model_card.schema.json``. Built-in cards live
in the repository's ``Resources/ModelCards/`` (copied into the wheel as
``volseg/resources/ModelCards``); users add their own folders with ``--cards-dir`` or the
``VOLSEG_CARDS_PATH`` environment variable (``os.pathsep``-separated), or point at a card file.

Cards are data from elsewhere: a card file is read only when it is a regular file (a FIFO or
device in a cards folder is reported, never read), at most :data:`MAX_CARD_BYTES`, parsed with
bounds (nesting, digits); a card that cannot be read is listed under the problems of
``volseg models`` and the other cards still work. A ``name_hint`` is a regular expression that
runs on the GUI thread, so only patterns that cannot backtrack for long are accepted
(:func:`check_name_hint`).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from volseg.errors import ModelCardError
from volseg.files import read_checked
from volseg.options import InferenceOptions

SCHEMA_PATH = Path(__file__).parent / "schema" / "model_card.schema.json"
CARDS_ENV = "VOLSEG_CARDS_PATH"
#: The id suffix of a card made from ``--arch NAME --num-labels N`` (:func:`card_from_arguments`).
ADHOC_SUFFIX = "-adhoc"
#: The largest card file read (real cards, with thousands of labels, are well under 1 MiB).
MAX_CARD_BYTES = 16 * 2**20
#: The longest ``name_hint``, the most unbounded repeats (``*``, ``+``, ``{n,}``) in one, and
#: how much of a name a hint is matched against: with no repeat nested in another, matching
#: then stays polynomial and small (at most about 128**3 steps).
MAX_HINT_CHARS = 200
MAX_HINT_REPEATS = 2
MAX_NAME_CHARS = 128

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
    invert: str = "probabilities"  # probabilities | labels_nearest (see the schema's postprocessing.invert)


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
                "notes": self.raw.get("checkpoint", {}).get("notes"),
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


#: At most this many schema problems are listed, each cut to this many characters.
MAX_SCHEMA_PROBLEMS = 10
MAX_PROBLEM_CHARS = 300


def _error_path(error) -> str:
    """The JSON path of a schema error (``$.labels[0].color``; ``$`` for the card itself)."""
    return getattr(error, "json_path", None) or "$" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


class CardSchemaError(ModelCardError):
    """A card that does not follow the schema: one line saying so, then one line per problem
    (its JSON path and what is wrong), at most :data:`MAX_SCHEMA_PROBLEMS`, then how many more."""

    def __init__(self, source: str, problems: Sequence[str], hint: str | None = None) -> None:
        super().__init__(f"{source} is not a valid model card:", hint)
        self.problems = list(problems)
        shown = [" ".join(p.split()) for p in self.problems[:MAX_SCHEMA_PROBLEMS]]
        shown = [p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS - 3] + "..." for p in shown]
        lines = [self.message] + [f"  - {p}" for p in shown]
        if len(self.problems) > MAX_SCHEMA_PROBLEMS:
            lines.append(f"  and {len(self.problems) - MAX_SCHEMA_PROBLEMS} more")
        self.message = "\n".join(lines)  # one problem a line (VolSegError keeps other messages on one)
        self.args = (self.message,)


def validate(raw: Any, source: str = "card") -> None:
    """Validate ``raw`` against the schema; raise :class:`CardSchemaError` listing the problems."""
    try:
        errors = sorted(_validator().iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))
    except RecursionError:
        raise ModelCardError(f"{source} is nested too deeply to be a model card") from None
    if errors:
        problems = []
        for e in errors:
            msg = e.message
            if e.validator == "additionalProperties":
                allowed = sorted(e.schema.get("properties", {}))
                msg += f" (allowed: {', '.join(allowed)})"
            problems.append(f"at {_error_path(e)}: {msg}")
        raise CardSchemaError(source, problems, hint=f"see the schema in {SCHEMA_PATH}")


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
    """The JSON of the card file ``path``: a regular file (never a FIFO or device, which would
    block or read without end), bounded in size, nesting and digits."""
    data = read_checked(path, "model card", MAX_CARD_BYTES, error=ModelCardError)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelCardError(f"model card {path} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ModelCardError(f"model card {path} is nested too deeply to be a model card") from None
    except json.JSONDecodeError as exc:
        raise ModelCardError(
            f"model card {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ModelCardError(f"model card {path} is not valid JSON: {' '.join(str(exc).split())[:120]}") from None


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
    _check_stated(arch["name"], dict(arch.get("config", {})), source,
                  how="state the values the network was trained with in the card's architecture.config")
    for n, item in enumerate(raw["inputs"]):
        if item.get("name_hint"):
            try:
                check_name_hint(item["name_hint"])
            except ValueError as exc:
                raise ModelCardError(f"{source}: inputs/{n}/name_hint {item['name_hint'][:60]!r} {exc}",
                                     hint="use plain words separated by | (e.g. \"t1c|t1gd|contrast\"); a hint may "
                                     "not repeat a group that itself repeats or has alternatives") from None
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
            whole_volume=bool(inf.get("whole_volume", False)),
            size_multiple=int(inf.get("size_multiple", 1)),
            select_output=int(output.get("select", 0)),
            out_channels=out_channels,
        ),
        postprocessing=PostprocessSettings(
            keep_largest_component=_bool_or_labels(post.get("keep_largest_component", False)),
            fill_holes=_bool_or_labels(post.get("fill_holes", False)),
            min_island_mm3=float(post.get("min_island_mm3", 0.0)),
            invert=post.get("invert", "probabilities"),
        ),
        checkpoint_path=ckpt_path,
        checkpoint_sha256=ckpt.get("sha256"),
        demonstration=bool(raw.get("demonstration", False)),
        description=raw.get("description", ""),
        modality=raw.get("modality"),
    )


def _check_stated(name: str, config: dict[str, Any], source: str, how: str) -> None:
    """Refuse a configuration that leaves out a setting the weights cannot show and that has no
    safe default (SegFormer3D's ``num_heads``): volseg does not guess it."""
    from volseg.models.builtin import unstated_settings

    missing = unstated_settings(name, config)
    if missing:
        raise ModelCardError(
            f"{source}: {name}'s {', '.join(missing)} cannot be read from the weights and "
            f"{'is' if len(missing) == 1 else 'are'} not given; volseg does not guess {'it' if len(missing) == 1 else 'them'}",
            hint=how.replace("{EXAMPLE}", ", ".join(f'"{m}": ...' for m in missing).join("{}"))
            + "; `volseg inspect CHECKPOINT` lists what the weights cannot show",
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
    counts = Counter(i["value"] for i in items)  # linear: a card may list 100,000 labels
    dupes = sorted(v for v, n in counts.items() if n > 1)
    if dupes:
        shown = ", ".join(map(str, dupes[:10])) + (f" and {len(dupes) - 10:,} more" if len(dupes) > 10 else "")
        raise ModelCardError(f"{source}: label values {shown} appear more than once", hint="each label needs its own value")
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


def _walk(parsed, sub_pattern: type) -> Iterable[tuple[Any, Any]]:
    """Every (op, argument) of a parsed pattern (``re``'s parser), depth first."""
    for op, av in parsed:
        yield op, av
        for child in (av if isinstance(av, (tuple, list)) else (av,)):
            if isinstance(child, sub_pattern):
                yield from _walk(child, sub_pattern)
            elif isinstance(child, list):  # a branch's alternatives
                for alternative in child:
                    if isinstance(alternative, sub_pattern):
                        yield from _walk(alternative, sub_pattern)


def check_name_hint(hint: str) -> re.Pattern:
    """The compiled ``hint`` when it is a regular expression that cannot backtrack for long.

    Refused: longer than :data:`MAX_HINT_CHARS`; not a valid expression; a repeated part that
    itself holds a repeat or alternatives (``(\\w+\\s?)+``, ``(a|ab)*``: exponential); more than
    :data:`MAX_HINT_REPEATS` unbounded (or more than 8-fold) repeats. Names are matched on their first
    :data:`MAX_NAME_CHARS` characters.

    Raises:
        ValueError: why the hint is refused.
    """
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover (3.10)
        import sre_parse  # type: ignore[no-redef]
    if len(hint) > MAX_HINT_CHARS:
        raise ValueError(f"is longer than {MAX_HINT_CHARS} characters")
    try:
        parsed = sre_parse.parse(hint, re.IGNORECASE)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None
    repeats = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None))
    unbounded = 0
    for op, av in _walk(parsed, sre_parse.SubPattern):
        if op not in repeats:
            continue
        _, high, body = av
        if high > 8:  # `*`, `+`, `{n,}`, and long bounded repeats alike
            unbounded += 1
        if high > 1 and any((o in repeats and a[1] > 1) or o == sre_parse.BRANCH
                            for o, a in _walk(body, sre_parse.SubPattern)):
            raise ValueError("repeats a part that itself repeats or has alternatives (it can take "
                             "exponential time on a non-matching name)")
    if unbounded > MAX_HINT_REPEATS:
        raise ValueError(f"has more than {MAX_HINT_REPEATS} unbounded repeats (*, +)")
    return re.compile(hint, re.IGNORECASE)


def match_inputs(hints: Sequence[str | None], names: Sequence[str]) -> list[int | None]:
    """For each input's name hint (a case-insensitive regular expression), the index in ``names``
    of the first name it matches that no earlier input took; None where nothing matches.

    A single input without a match takes the first name. Used to pre-fill the Slicer panel's
    input selectors and to pick each channel's file in ``volseg batch`` case folders. A hint
    :func:`check_name_hint` refuses matches nothing (it could block the GUI for minutes).
    """
    taken: set[int] = set()
    chosen: list[int | None] = []
    for hint in hints:
        pick = None
        if hint:
            try:
                pattern = check_name_hint(hint)
            except ValueError:
                pattern = None
            if pattern is not None:
                pick = next((i for i, n in enumerate(names)
                             if i not in taken and pattern.search(n[:MAX_NAME_CHARS])), None)
        if pick is not None:
            taken.add(pick)
        chosen.append(pick)
    if len(hints) == 1 and chosen[0] is None and names:
        chosen[0] = 0
    return chosen


def load_card(ref: str | Path, cards_dirs_: Sequence[str | Path] | None = None) -> ModelCard:
    """Load a card by id (searched in :func:`cards_dirs`), by path to a ``.json`` file, or by path to
    a MONAI bundle folder or ``.zip`` (translated by :mod:`volseg.bundles`, nothing of it run)."""
    p = Path(ref).expanduser()
    from volseg.bundles.source import is_bundle_dir

    if is_bundle_dir(p) or (p.suffix.lower() == ".zip" and p.is_file()):
        from volseg.bundles.translate import bundle_card

        return bundle_card(p)[0]
    if p.suffix.lower() == ".json" or p.is_file():
        if not p.exists():
            raise ModelCardError(f"model card file {p} does not exist")
        return parse_card(_read_json(p), p.resolve())
    known = _index(cards_dirs(cards_dirs_))
    if str(ref) in known:
        path = known[str(ref)]
        return parse_card(_read_json(path), path)
    from volseg.bundles.catalogue import bundle_dirs
    from volseg.bundles.metadata import card_id

    bundles = {card_id(p.name): p for p in bundle_dirs(cards_dirs_)}
    if str(ref) in bundles:  # a bundle folder in a cards folder, by the id `volseg models` shows
        from volseg.bundles.translate import bundle_card

        return bundle_card(bundles[str(ref)])[0]
    import difflib

    close = difflib.get_close_matches(str(ref), list(known) + list(bundles), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run `volseg models` to list the cards"
    raise ModelCardError(f"unknown model {str(ref)!r}", hint=hint)


def _index(dirs: Sequence[Path], problems: list[str] | None = None) -> dict[str, Path]:
    """Card id -> path; earlier folders win (a user's card shadows a built-in one). A file that
    cannot be read as a card is skipped; with ``problems`` given, it is listed there."""
    index: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            try:
                raw = _read_json(path)
            except ModelCardError as exc:
                if problems is not None:
                    problems.append(exc.message if str(path) in exc.message else f"{path}: {exc.message}")
                continue
            card_id = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(card_id, str):
                index.setdefault(card_id, path)
            elif problems is not None:
                problems.append(f"{path}: not a model card (no \"id\" text at the top level)")
    return index


def list_cards(cards_dirs_: Sequence[str | Path] | None = None) -> tuple[list[ModelCard], list[str]]:
    """All cards found, and a message for each card file that cannot be used (shown, not fatal)."""
    cards: list[ModelCard] = []
    problems: list[str] = []
    for card_id, path in sorted(_index(cards_dirs(cards_dirs_), problems).items()):
        try:
            cards.append(parse_card(_read_json(path), path))
        except ModelCardError as exc:
            problems.append(exc.message if str(path) in exc.message else f"{path}: {exc.message}")
    return cards, problems


def card_from_arguments(architecture: str, num_labels: int, in_channels: int = 1,
                        config: dict[str, Any] | None = None, activation: str | None = None) -> ModelCard:
    """A minimal card for a checkpoint without one (``--arch NAME --num-labels N``).

    The output activation is ``activation`` (``--activation``), else the architecture family's
    (softmax with a background channel); TorchScript is taken as softmax. A family trained both
    ways (SegFormer3D) and a setting the weights cannot show without a safe default
    (SegFormer3D's ``num_heads``) must be given: volseg refuses to guess them.

    Raises:
        ModelCardError: an unknown architecture, or a setting that must be given and was not.
    """
    from volseg.models.builtin import EITHER_ACTIVATION, output_kind

    _check_architecture(architecture, "--arch")
    _check_stated(architecture, dict(config or {}), "--arch",
                  how="pass the values the network was trained with, --arch-config '{EXAMPLE}', "
                  "or use a model card that states them (`volseg models`)")
    if activation is None and architecture.lower() in EITHER_ACTIVATION:
        raise ModelCardError(
            f"--arch {architecture}: the output activation cannot be read from the weights ({architecture} is "
            "trained with sigmoid or with softmax outputs) and volseg does not guess it",
            hint="pass --activation sigmoid (one channel per label) or --activation softmax (a background channel "
            "plus one per label), or use a model card (`volseg models`)",
        )
    if activation is None:
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
