"""The model list, input matching and segment rows (pure Python, no Slicer, no Qt).

The model list comes from ``volseg models --json``::

    {"models": [{"id", "title", "description", "architecture", "modality",
                 "inputs": [{"name", "modality", "name_hint"}],
                 "labels": [{"value", "name", "color": [r, g, b], "terminology": {...} | null}],
                 "checkpoint": {"path", "sha256", "published_at", "notes"}, "timing": {"gpu_s", "cpu_s"},
                 "demonstration": bool, "card_path"}]}
"""

from __future__ import annotations

import html
import json
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

from VolSegSlicerLib.protocol import format_duration
from volseg.cards import match_inputs

#: The panel has this many input selectors.
MAX_INPUTS = 4


def parse_models_json(text: str) -> list[dict[str, Any]]:
    """The ``models`` list of ``volseg models --json`` output (raises ValueError if malformed)."""
    data = json.loads(text)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError("'volseg models --json' did not print a {\"models\": [...]} object")
    return [m for m in models if isinstance(m, dict) and m.get("id")]


def search_text(model: dict[str, Any]) -> str:
    """Everything the search box looks in: title, id, description, architecture, modality,
    input names and label names (lower case)."""
    parts = [model.get("title", ""), model.get("id", ""), model.get("description", ""),
             str(model.get("architecture", "")), model.get("modality", "")]
    parts += [i.get("name", "") for i in model.get("inputs", [])]
    parts += [lbl.get("name", "") for lbl in model.get("labels", [])]
    return " ".join(str(p) for p in parts if p).lower()


def filter_models(models: Iterable[dict[str, Any]], query: str) -> list[dict[str, Any]]:
    """Models matching every word of ``query`` (case-insensitive, in any field of :func:`search_text`)."""
    words = query.lower().split()
    return [m for m in models if all(w in search_text(m) for w in words)]


def model_tooltip_html(model: dict[str, Any]) -> str:
    """A small HTML card: title, architecture, modality, inputs, labels, expected times."""
    esc = html.escape
    arch = model.get("architecture")
    arch_name = arch.get("name") if isinstance(arch, dict) else arch
    rows = [f"<b>{esc(str(model.get('title') or model.get('id')))}</b>"]
    if model.get("demonstration"):
        rows.append("<i>Demonstration model: not for use on patients.</i>")
    if model.get("description"):
        rows.append(esc(str(model["description"])))
    rows.append(f"Architecture: {esc(str(arch_name or 'unknown'))}")
    rows.append(f"Modality: {esc(str(model.get('modality') or 'unknown'))}")
    inputs = ", ".join(esc(str(i.get("name", "?"))) for i in model.get("inputs", []))
    rows.append(f"Inputs: {inputs or 'one image'}")
    labels = model.get("labels", [])
    names = ", ".join(esc(str(lbl.get("name", "?"))) for lbl in labels[:30])
    more = f" and {len(labels) - 30} more" if len(labels) > 30 else ""
    rows.append(f"Labels ({len(labels)}): {names}{more}")
    timing = model.get("timing") or {}
    times = []
    if timing.get("gpu_s") is not None:
        times.append(f"GPU about {format_duration(timing['gpu_s'])}")
    if timing.get("cpu_s") is not None:
        times.append(f"CPU about {format_duration(timing['cpu_s'])}")
    if times:
        rows.append("Expected time: " + ", ".join(times))
    checkpoint = model.get("checkpoint") or {}
    if checkpoint.get("published_at"):
        rows.append(f"Weights: {esc(str(checkpoint['published_at']))}")
    if checkpoint.get("notes"):
        rows.append(f"Checkpoint notes: {esc(str(checkpoint['notes']))}")
    return "<br>".join(rows)


def input_titles(model: dict[str, Any]) -> list[str]:
    """One title per input channel of the card (at most :data:`MAX_INPUTS`)."""
    inputs = model.get("inputs") or [{"name": "Image"}]
    titles = []
    for item in inputs[:MAX_INPUTS]:
        name = str(item.get("name") or "Image")
        modality = item.get("modality")
        titles.append(f"{name} ({modality})" if modality and modality.lower() not in name.lower() else name)
    return titles


def prefill_inputs(model: dict[str, Any], node_names: Sequence[str]) -> list[int | None]:
    """For each card input, the index in ``node_names`` of the first volume whose name matches the
    input's ``name_hint`` (case-insensitive regex) and is not taken by an earlier input.

    Inputs without a hint (or without a match) get None, except that a single-input card with
    no hint match takes the first volume (the engine's :func:`volseg.cards.match_inputs`)."""
    inputs = (model.get("inputs") or [{"name": "Image"}])[:MAX_INPUTS]
    return match_inputs([item.get("name_hint") for item in inputs], node_names)


def duplicate_inputs(ids: Sequence[str | None]) -> list[tuple[int, int]]:
    """Pairs of input positions ``(first, second)`` that name the same volume (ignoring empties)."""
    seen: dict[str, int] = {}
    pairs = []
    for pos, node_id in enumerate(ids):
        if not node_id:
            continue
        if node_id in seen:
            pairs.append((seen[node_id], pos))
        else:
            seen[node_id] = pos
    return pairs


def segment_rows(model: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per card label, in card order: ``id`` (segment ID), ``value``, ``name``, ``color``
    (floats 0..1) and ``terminology_tag`` (Slicer's serialized terminology entry, '' when the
    card has none).

    The tag comes from the engine's :func:`volseg.terminology.segment_table`, so segments made
    here and the engine's own ``.seg.nrrd`` files carry the same IDs and terminology."""
    from volseg.terminology import segment_table  # the engine is installed beside the module

    labels = [SimpleNamespace(value=int(lbl["value"]), name=str(lbl["name"]),
                              color=tuple(lbl.get("color") or (128, 128, 128)),
                              terminology=lbl.get("terminology"))
              for lbl in model.get("labels") or []]
    return [{"id": row["id"], "value": row["value"], "name": row["name"],
             "color": tuple(float(c) for c in row["color"]), "terminology_tag": row["terminology"] or ""}
            for row in segment_table(labels)]


def import_segment_ids(rows: Sequence[dict[str, Any]], present_values: Iterable[int]) -> list[str]:
    """The ``segmentIds`` argument of ``ImportLabelmapToSegmentationNode(labelmap, seg, segmentIds)``.

    Slicer fills the segment named at position ``i`` of that list with label value ``i + 1``, so
    the list is indexed by value: ``ids[v - 1]`` is the segment of label value ``v`` and values
    the card does not use are ``""``. It ends at the largest value present ([] when the label map
    is empty). A value present that the card does not name raises ValueError (the label map and
    the card do not belong together)."""
    ids_by_value = {int(r["value"]): r["id"] for r in rows}
    present = sorted({int(v) for v in present_values if int(v) != 0})
    unknown = [v for v in present if v not in ids_by_value]
    if unknown:
        raise ValueError(f"the result has label values {unknown} that the model card does not name")
    return [ids_by_value.get(value, "") for value in range(1, (present[-1] if present else 0) + 1)]
