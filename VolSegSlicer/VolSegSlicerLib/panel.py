"""What the panel shows, decided without Qt: model texts, button states, end-of-run messages.

The widget in ``VolSegSlicer.py`` only copies these values onto its widgets, so every rule
about what is enabled and what the user is told is tested here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from VolSegSlicerLib.catalog import MAX_INPUTS, duplicate_inputs, input_titles
from VolSegSlicerLib.protocol import format_duration

#: Longest model description shown under the list (the whole card is in the item's tooltip).
SUMMARY_CHARS = 300
DEMONSTRATION_NOTICE = "Demonstration model: it only shows the software working and must not be used on patients."


def model_list_title(model: dict) -> str:
    """The model's line in the list."""
    title = str(model.get("title") or model["id"])
    return title + " (demonstration)" if model.get("demonstration") else title


def model_summary(model: dict) -> str:
    """The text under the model list for the selected model."""
    if model.get("demonstration"):
        return DEMONSTRATION_NOTICE
    info = str(model.get("description") or "")
    if len(info) > SUMMARY_CHARS:
        info = info[:SUMMARY_CHARS].rsplit(" ", 1)[0] + " ..."
    return info


@dataclass
class PanelState:
    """The state of the panel's controls."""

    input_titles: list[str] = field(default_factory=list)
    input_warning: str = ""
    apply_text: str = "Segment"
    apply_enabled: bool = False
    apply_tooltip: str = ""
    advanced_enabled: bool = False
    replace_enabled: bool = False
    export_enabled: bool = False
    dicom_export_enabled: bool = False

    def input_visible(self, index: int) -> bool:
        return index < len(self.input_titles)


def panel_state(model: Optional[dict], input_ids: Sequence[Optional[str]], running: bool, cancel_requested: bool,
                use_model_settings: bool, has_output: bool, output_from_dicom: bool) -> PanelState:
    """The panel's state from the selected model, the chosen input volumes (node IDs, None where
    empty; one per card input), the run and the output segmentation."""
    titles = input_titles(model) if model else ["Input volume"]
    state = PanelState(input_titles=titles[:MAX_INPUTS], advanced_enabled=not use_model_settings,
                       replace_enabled=has_output)
    duplicates = duplicate_inputs(list(input_ids))
    if duplicates:
        first, second = duplicates[0]
        state.input_warning = f"'{titles[first]}' and '{titles[second]}' are the same volume; each input needs its own."
    if running:
        state.apply_text, state.apply_enabled = "Cancel", not cancel_requested
        state.apply_tooltip = "Stop the segmentation; nothing is changed"
    else:
        ready = model is not None and len(input_ids) == len(titles) and all(input_ids) and not duplicates
        state.apply_enabled = ready
        state.apply_tooltip = "Run the model on the inputs" if ready else "Select a model and its input volumes first"
    state.export_enabled = has_output and not running
    state.dicom_export_enabled = state.export_enabled and output_from_dicom
    return state


@dataclass
class RunEnd:
    """What the panel says when a run ends."""

    status: str
    error: str = ""  # non-empty: shown in an error dialog too
    progress_visible: bool = True


def run_end(job: Any) -> RunEnd:
    """The end-of-run message for a finished :class:`~VolSegSlicerLib.jobs.SegmentationJob`."""
    monitor = job.monitor
    if job.segmentationNode is not None:
        count = job.segmentationNode.GetSegmentation().GetNumberOfSegments()
        return RunEnd(f"Done in {format_duration(job.elapsed)}: {count} segments in "
                      f"'{job.segmentationNode.GetName()}'. Review and edit them in Segment Editor.")
    if monitor.outcome == "cancelled" and not job.abandonReason:
        return RunEnd("Cancelled; nothing was changed.", progress_visible=False)
    message = monitor.error + (f"\nHint: {monitor.hint}" if monitor.hint else "")
    return RunEnd(f"Failed: {monitor.error}", error=message)
