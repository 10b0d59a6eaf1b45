"""``volseg demo``: the whole path on bundled data, with no arguments.

It segments the chest CT that slicerio ships (CTChest4.nrrd) with the demonstration model
(card ``demo``), writes ``CTChest4-demo.seg.nrrd`` and a PNG with a few slices and the labels
overlaid, in a new folder (``volseg-demo``, or ``volseg-demo-2``... so nothing is overwritten).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from volseg.cards import load_card
from volseg.errors import InputError
from volseg.io import atomic_output, check_writable, make_output_folder, read_volume
from volseg.progress import Reporter

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


def to_lps_axes(array: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Permute and flip an (I, J, K) array so its axes run toward L, P and S (nearest axes).

    Then ``a[:, :, z].T`` is an axial slice in radiological display (anterior at the top,
    the patient's right on the left) whatever order the file stored the voxels in.
    """
    axes = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]  # LPS axis of each index axis
    out = np.transpose(array, np.argsort(axes))
    for lps_axis in range(3):
        source_axis = axes.index(lps_axis)
        if direction[lps_axis, source_axis] < 0:
            out = np.flip(out, axis=lps_axis)
    return out


def overlay_png(ct: np.ndarray, labels: np.ndarray, colors: dict[int, tuple[int, int, int]], path: Path,
                window: tuple[float, float] = (-1000.0, 400.0), alpha: float = 0.45) -> Path:
    """Save a strip of axial slices (at 25/50/75 % of the S axis) and a coronal slice with labels overlaid.

    ``ct`` and ``labels`` are arrays on the same grid with axes toward L, P, S (see
    :func:`to_lps_axes`); ``colors`` maps value -> RGB.
    """
    from PIL import Image

    lo, hi = window
    gray = np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    lut = np.zeros((int(labels.max(initial=0)) + 1, 3), np.float32)
    for value, rgb in colors.items():
        if value < len(lut):
            lut[value] = rgb

    def render(g: np.ndarray, lab: np.ndarray) -> np.ndarray:
        rgb = np.repeat(g[..., None], 3, axis=-1)
        mask = lab > 0
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * lut[lab[mask]]
        return rgb.astype(np.uint8)

    k = labels.shape[2]
    tiles = []
    for frac in (0.25, 0.5, 0.75):
        z = min(k - 1, int(frac * k))
        tiles.append(render(gray[:, :, z].T, labels[:, :, z].T))  # rows: anterior to posterior
    j = labels.shape[1] // 2
    coronal = render(gray[:, j, :].T[::-1], labels[:, j, :].T[::-1])  # superior at the top
    height = tiles[0].shape[0]
    scale = max(1, round(height / coronal.shape[0]))
    coronal = np.repeat(coronal, scale, axis=0)[:height]
    pad = np.zeros((height - coronal.shape[0], coronal.shape[1], 3), np.uint8)
    strip = np.concatenate([*tiles, np.concatenate([coronal, pad], axis=0)], axis=1)
    picture = Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST)
    with atomic_output(path, overwrite=True) as tmp:
        picture.save(tmp, format="PNG")
    return path


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
    result = segment(SegmentRequest(inputs=[ct], card=card, output=out, device=device, overwrite=overwrite),
                     reporter, cancel)
    import slicerio

    seg = slicerio.read_segmentation(str(out))
    colors = {int(s["labelValue"]): tuple(int(round(c * 255)) for c in s["color"]) for s in seg["segments"]}
    volume = read_volume(ct)
    overlay_png(to_lps_axes(volume.array, volume.direction),
                to_lps_axes(np.asarray(seg["voxels"]), volume.direction), colors, png)
    reporter.log(f"picture of a few slices with the labels: {png}")
    return {**result, "png": str(png)}
