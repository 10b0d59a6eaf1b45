"""Segment terminology in the forms 3D Slicer reads, without importing Slicer.

A model card describes each label's content with DICOM-style coded concepts::

    {"category": ["SCT", "123037004", "Anatomical Structure"],
     "type": ["SCT", "10200004", "Liver"],
     "type_modifier": ["SCT", "24028007", "Right"],        # optional
     "region": [...], "region_modifier": [...]}              # optional

Slicer stores the same content in a segment's ``TerminologyEntry`` tag (also the
``SegmentN_Tags`` field of a .seg.nrrd file) as seven ``~``-separated parts::

    context name ~ category ~ type ~ type modifier ~ anatomic context name ~ region ~ region modifier

where each coded part is ``scheme^value^meaning`` and an absent one is ``^^``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Slicer's terminology context holding the DICOM segmentation category/type codes.
DEFAULT_CONTEXT = "Segmentation category and type - DICOM master list"
#: Slicer's terminology context holding the DICOM anatomic region codes.
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

#: Coded parts of a terminology entry, in tag order (region parts after the anatomic context).
CODE_KEYS = ("category", "type", "type_modifier", "region", "region_modifier")
_RESERVED = ("~", "^", "|")
_EMPTY_CODE = "^^"


def _code_to_text(key: str, code: Sequence[str] | None) -> str:
    if code is None:
        return _EMPTY_CODE
    if isinstance(code, str) or len(code) != 3:
        raise ValueError(f"terminology '{key}' must be a [scheme, value, meaning] triplet, got {code!r}")
    parts = [str(part) for part in code]
    for part in parts:
        for char in _RESERVED:
            if char in part:
                raise ValueError(f"terminology '{key}' code {parts!r} contains '{char}', which Slicer's tag format reserves")
    return "^".join(parts)


def _text_to_code(text: str) -> list[str] | None:
    parts = text.split("^")
    if len(parts) != 3:
        raise ValueError(f"terminology code {text!r} is not scheme^value^meaning")
    return None if not any(parts) else parts


def slicer_terminology_tag(
    terminology: Mapping[str, Any],
    context_name: str = DEFAULT_CONTEXT,
    anatomic_context_name: str = DEFAULT_ANATOMIC_CONTEXT,
) -> str:
    """The value of Slicer's ``TerminologyEntry`` segment tag for a card terminology.

    Args:
        terminology: dict with ``category`` and ``type`` and optionally ``type_modifier``,
            ``region``, ``region_modifier``, each a [scheme, value, meaning] triplet.
        context_name: the segmentation category/type context name written in the tag.
        anatomic_context_name: the anatomic region context name written in the tag.

    Returns:
        e.g. ``"Segmentation category and type - DICOM master list~SCT^123037004^Anatomical
        Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"``.

    Raises:
        ValueError: category or type missing, a code that is not a triplet, or a code
            containing one of the reserved characters ``~ ^ |``.
    """
    for key in ("category", "type"):
        if not terminology.get(key):
            raise ValueError(f"terminology needs a '{key}' [scheme, value, meaning] triplet")
    unknown = set(terminology) - set(CODE_KEYS) - {"context_name", "anatomic_context_name"}
    if unknown:
        raise ValueError(f"unknown terminology keys {sorted(unknown)}; expected {list(CODE_KEYS)}")
    for name in (context_name, anatomic_context_name):
        if any(char in name for char in _RESERVED):
            raise ValueError(f"terminology context name {name!r} contains a reserved character")
    parts = [
        context_name,
        _code_to_text("category", terminology["category"]),
        _code_to_text("type", terminology["type"]),
        _code_to_text("type_modifier", terminology.get("type_modifier")),
        anatomic_context_name,
        _code_to_text("region", terminology.get("region")),
        _code_to_text("region_modifier", terminology.get("region_modifier")),
    ]
    return "~".join(parts)


def parse_slicer_terminology_tag(tag: str) -> dict[str, Any]:
    """Parse a Slicer ``TerminologyEntry`` tag (with or without the ``TerminologyEntry:`` prefix).

    Returns:
        dict with ``context_name``, ``anatomic_context_name``, ``category``, ``type`` and those
        of ``type_modifier``, ``region``, ``region_modifier`` that are present (as lists).

    Raises:
        ValueError: the tag does not have the seven ``~``-separated parts.
    """
    text = tag.strip()
    if text.startswith("TerminologyEntry:"):
        text = text[len("TerminologyEntry:"):]
    parts = text.split("~")
    if len(parts) != 7:
        raise ValueError(f"a Slicer terminology tag has 7 '~'-separated parts, got {len(parts)} in {tag!r}")
    result: dict[str, Any] = {"context_name": parts[0], "anatomic_context_name": parts[4]}
    for key, part in zip(CODE_KEYS, (parts[1], parts[2], parts[3], parts[5], parts[6]), strict=True):
        code = _text_to_code(part)
        if code is not None:
            result[key] = code
    return result


def to_slicerio_terminology(terminology: Mapping[str, Any]) -> dict[str, Any]:
    """The terminology as the dict ``slicerio`` reads and writes (camelCase keys)."""
    tag = slicer_terminology_tag(
        terminology,
        terminology.get("context_name", DEFAULT_CONTEXT),
        terminology.get("anatomic_context_name", DEFAULT_ANATOMIC_CONTEXT),
    )
    parsed = parse_slicer_terminology_tag(tag)
    names = {
        "category": "category",
        "type": "type",
        "type_modifier": "typeModifier",
        "region": "anatomicRegion",
        "region_modifier": "anatomicRegionModifier",
    }
    result: dict[str, Any] = {
        "contextName": parsed["context_name"],
        "anatomicContextName": parsed["anatomic_context_name"],
    }
    for key, slicerio_key in names.items():
        if key in parsed:
            result[slicerio_key] = list(parsed[key])
    return result


def color_to_float(color: Sequence[int]) -> tuple[float, float, float]:
    """An 8-bit (r, g, b) colour as floats in [0, 1]."""
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
        raise ValueError(f"colour must be three integers 0-255, got {color!r}")
    return tuple(int(c) / 255.0 for c in color)  # type: ignore[return-value]


def segment_id(value: int) -> str:
    """The segment ID used for a label value (Slicer's own default form, ``Segment_<value>``)."""
    return f"Segment_{int(value)}"


def segment_table(labels: Sequence[Any]) -> list[dict[str, Any]]:
    """Per label, what a Slicer segment needs: ID, value, name, colour and terminology tag.

    Args:
        labels: objects with ``value`` (int > 0), ``name``, ``color`` (r, g, b 0-255) and
            ``terminology`` (dict or None) attributes, e.g. ``volseg.cards.Label``.

    Returns:
        list of dicts ``{"id", "value", "name", "color" (floats 0-1), "terminology" (tag str or
        None)}``, in the order of ``labels``.

    Raises:
        ValueError: a duplicate or non-positive value, a bad colour or terminology.
    """
    table = []
    seen: set[int] = set()
    for label in labels:
        value = int(label.value)
        if value <= 0:
            raise ValueError(f"label '{label.name}' has value {value}; label values must be > 0 (0 is background)")
        if value in seen:
            raise ValueError(f"label value {value} is used twice")
        seen.add(value)
        terminology = getattr(label, "terminology", None)
        table.append(
            {
                "id": segment_id(value),
                "value": value,
                "name": str(label.name),
                "color": color_to_float(label.color),
                "terminology": slicer_terminology_tag(terminology) if terminology else None,
            }
        )
    return table
