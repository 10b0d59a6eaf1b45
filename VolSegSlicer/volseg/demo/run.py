"""``volseg demo``: the whole path on bundled data, with no arguments.

It segments the chest CT that slicerio ships (CTChest4.nrrd) with the demonstration model
(card ``demo``), writes ``CTChest4-demo.seg.nrrd`` and a PNG with a few slices, the labels
overlaid, a colour key and a not-for-clinical-use notice (:mod:`volseg.demo.picture`), in a new
folder (``volseg-demo``, or ``volseg-demo-2``... so nothing is overwritten). The final ``done``
event names both files.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from volseg.cards import load_card
from volseg.demo.picture import KeyEntry, lps_spacing, overview_png, to_lps_axes
from volseg.errors import InputError
from volseg.io import check_writable, make_output_folder, read_volume
from volseg.progress import Reporter

__all__ = ["DEMO_CARD", "fresh_folder", "run_demo", "sample_ct", "to_lps_axes"]

DEMO_CARD = "demo"


def sample_ct() -> Path:
    """slicerio's bundled chest CT (128 x 128 x 34, 3 x 3 x 10 mm)."""
    try:
        import slicerio
    except ImportError:  # pragma: no cover - slicerio is a dependency
        raise InputError("the demo needs the slicerio package (pip install slicerio)") from None
    path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    if not path.is_file():
        raise InputError(f"slicerio's sample CT is missing at {path}", hint="reinstall slicerio")
    return path


def fresh_folder(base: Path) -> Path:
    """``base`` if it does not exist yet, else ``base-2``, ``base-3``, ..."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class _DoneLast:
    """Passes a reporter's events on, except ``done``: that is kept until the picture is written,
    so the ``done`` event stays the last one and names the PNG too."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter
        self.held: tuple[dict, dict] | None = None

    def done(self, outputs: dict, **extra) -> None:
        self.held = (outputs, extra)

    def __getattr__(self, name: str):
        return getattr(self._reporter, name)


def run_demo(output_dir: Path | None, device: str, reporter: Reporter,
             cancel: threading.Event | None = None, overwrite: bool = False) -> dict:
    """Segment the sample CT into ``output_dir`` (default: a new ``./volseg-demo*`` folder).

    Results already in ``output_dir`` are refused unless ``overwrite``.
    """
    from volseg.pipeline import SegmentRequest, segment

    ct = sample_ct()
    card = load_card(DEMO_CARD)
    folder = output_dir if output_dir is not None else fresh_folder(Path.cwd() / "volseg-demo")
    make_output_folder(folder)
    out = folder / "CTChest4-demo.seg.nrrd"
    png = folder / "CTChest4-demo.png"
    check_writable(png, overwrite=overwrite)  # refuse before spending time on inference
    held = _DoneLast(reporter)
    result = segment(SegmentRequest(inputs=[ct], card=card, output=out, device=device, overwrite=overwrite),
                     held, cancel)  # type: ignore[arg-type]  (a Reporter in all but its type)
    reporter.stage("picture", f"drawing {png.name}")
    import slicerio

    seg = slicerio.read_segmentation(str(out))
    key = [KeyEntry(int(s["labelValue"]), s["name"], tuple(int(round(c * 255)) for c in s["color"]))
           for s in seg["segments"]]
    volume = read_volume(ct)
    overview_png(to_lps_axes(volume.array, volume.direction), to_lps_axes(np.asarray(seg["voxels"]), volume.direction),
                 key, png, spacing=lps_spacing(volume.spacing, volume.direction), overwrite=overwrite,
                 title=f"{ct.name} segmented by {card.id!r}: {card.title}")
    outputs, extra = held.held if held.held is not None else (result["outputs"], {})
    outputs = {**outputs, "png": str(png)}
    reporter.done(outputs, **extra)
    return {**result, "outputs": outputs, "png": str(png)}
