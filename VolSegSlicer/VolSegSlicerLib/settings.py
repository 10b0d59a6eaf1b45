"""The panel's run settings, their engine options and what is remembered between sessions.

The module's parameter node (``@parameterNodeWrapper``) has the fields of :class:`RunSettings`
under the same names, so anything here accepts either: scripts and tests use the dataclass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from VolSegSlicerLib.command import SegmentOptions

#: Settings remembered across sessions (besides model, checkpoint and device).
REMEMBERED_FIELDS = ("useModelSettings", "overlap", "roiX", "roiY", "roiZ", "swBatchSize", "flips", "amp",
                     "keepLargest", "fillHoles", "minIslandMm3", "keepWarm", "replaceOutput")


@dataclass
class RunSettings:
    """What the panel decides about a run (the parameter node's fields, same names)."""

    checkpointPath: str = ""
    device: str = "auto"
    useModelSettings: bool = True
    overlap: float = 0.5
    roiX: int = 0
    roiY: int = 0
    roiZ: int = 0
    swBatchSize: int = 0
    flips: bool = False
    amp: bool = True
    keepLargest: bool = False
    fillHoles: bool = False
    minIslandMm3: float = 0.0
    keepWarm: bool = False
    replaceOutput: bool = False
    outputSegmentation: Any = None
    #: "computer" or "server" (the server's URL and token are in the application settings:
    #: VolSegSlicerLib.remote, never in the scene)
    runOn: str = "computer"

    @classmethod
    def of(cls, parameters: Any) -> "RunSettings":
        """A copy of the fields of ``parameters`` (a parameter node or another RunSettings)."""
        return cls(**{f.name: getattr(parameters, f.name) for f in fields(cls) if hasattr(parameters, f.name)})


def segment_options(model: dict, input_paths: Sequence[str], output_path: str, settings: Any,
                    cards_dir: str = "") -> SegmentOptions:
    """The engine options for a run of ``model`` from the panel's settings."""
    return SegmentOptions(
        model=model.get("card_path") or model["id"],
        inputs=list(input_paths),
        output=output_path,
        checkpoint=settings.checkpointPath or "",
        device=settings.device or "auto",
        use_model_settings=settings.useModelSettings,
        overlap=settings.overlap,
        roi_size=(settings.roiX, settings.roiY, settings.roiZ),
        sw_batch_size=settings.swBatchSize,
        flips=settings.flips,
        amp=settings.amp,
        keep_largest=settings.keepLargest,
        fill_holes=settings.fillHoles,
        min_island_mm3=settings.minIslandMm3,
        cards_dir=cards_dir,
    )


def remembered_json(parameters: Any) -> str:
    """The settings to remember, as the JSON text stored in the application settings."""
    return json.dumps({name: getattr(parameters, name) for name in REMEMBERED_FIELDS})


def restore_remembered(parameters: Any, text: str) -> list[str]:
    """Put remembered settings into ``parameters``; a value of the wrong type (from another
    version) or a broken text keeps the default. Returns the names that were not restored."""
    try:
        values = json.loads(text) if text else {}
    except ValueError:
        return list(REMEMBERED_FIELDS)
    skipped = []
    for name in REMEMBERED_FIELDS:
        if name not in values:
            continue
        current = getattr(parameters, name)
        try:
            value = values[name]
            if isinstance(current, bool) and not isinstance(value, bool):
                raise TypeError(name)
            setattr(parameters, name, type(current)(value))
        except (TypeError, ValueError):
            skipped.append(name)
    return skipped


def restore_settings(parameters: Any, value: Callable[[str, Any], Any]) -> list[str]:
    """Fill a fresh parameter node from the application settings (``value(key, default)``):
    the remembered advanced settings, device and last model. Returns the names not restored."""
    skipped = restore_remembered(parameters, value("Advanced", ""))
    parameters.device = value("Device", "auto")
    parameters.modelId = value("LastModel", "")
    return skipped


def save_settings(parameters: Any, set_value: Callable[[str, Any], None]) -> None:
    """Remember the parameter node's settings (``set_value(key, value)``) for the next session."""
    set_value("Advanced", remembered_json(parameters))
    set_value("Device", parameters.device)
    if parameters.modelId:
        set_value("LastModel", parameters.modelId)
