"""The demo's picture: a few CT slices with the labels overlaid, a colour key and a notice.

:func:`overview_png` draws three axial slices (at 25, 50 and 75 % of the superior axis) and a
coronal slice through the middle, all at one physical scale, each captioned with its number
and the way numbering runs (axial slices from the feet, 1 = inferior; coronal from the front,
1 = anterior), with dashed reference lines where the others cut it, in radiological display (the
patient's right on the left of each slice), with orientation letters on every side. Labels
are filled half-transparent; a label covering much of the volume (the demo's "tissue") is drawn
as an outline over a faint fill, so that the CT under it stays readable. A key names each
label with its colour, and a band states that the model is not for clinical use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volseg.io.atomic import atomic_output

NOT_FOR_CLINICAL_USE = "Demonstration model - NOT FOR CLINICAL USE"


#: Reference lines (dashed, as a viewer shows slice intersections): on the coronal slice where the
#: axial slices cut it, on the axial slices where the coronal slice cuts them.
AXIAL_LINE = (255, 255, 0)
CORONAL_LINE = (255, 128, 255)


def _dashed(draw, x0: int, x1: int, y: int, color: tuple[int, int, int], dash: int = 6) -> None:
    """A horizontal dashed line from ``x0`` to ``x1`` at ``y``, one pixel thick."""
    for x in range(x0, x1, 2 * dash):
        draw.line((x, y, min(x + dash - 1, x1 - 1), y), fill=color, width=1)


def axial_caption(z: int, nz: int) -> str:
    """The axial slice's caption: its number (from 1) and which way numbering runs."""
    return f"axial {z + 1}/{nz} (1 = inferior)"


def coronal_caption(j: int, ny: int) -> str:
    """The coronal slice's caption: its number (from 1) and which way numbering runs."""
    return f"coronal {j + 1}/{ny} (1 = anterior)"


@dataclass(frozen=True)
class KeyEntry:
    """One label in the picture: its value in the label map, name and RGB colour (0-255)."""

    value: int
    name: str
    color: tuple[int, int, int]


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


def lps_spacing(spacing: Sequence[float], direction: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing along the axes of :func:`to_lps_axes`'s result (L, P, S)."""
    axes = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    return tuple(float(spacing[axes.index(lps_axis)]) for lps_axis in range(3))  # type: ignore[return-value]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` that touch a pixel outside it (4-neighbourhood), 2 pixels wide."""
    inner = mask.copy()
    for _ in range(2):
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _resize(a: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``a`` (rows, cols) resized to ``size`` = (width, height)."""
    from PIL import Image

    if nearest:
        return np.asarray(Image.fromarray(a.astype(np.int32)).resize(size, Image.NEAREST))
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize(size, Image.BILINEAR))


def _render(gray: np.ndarray, labels: np.ndarray, key: Sequence[KeyEntry], outlined: set[int],
            size: tuple[int, int], alpha: float) -> np.ndarray:
    """One slice as RGB at ``size``: grey CT, filled labels, outlined big labels."""
    g = np.clip(_resize(gray, size, nearest=False), 0, 255)
    lab = _resize(labels, size, nearest=True)
    rgb = np.repeat(g[..., None], 3, axis=-1).astype(np.float32)
    for entry in key:
        mask = lab == entry.value
        if not mask.any():
            continue
        color = np.asarray(entry.color, np.float32)
        fill = alpha / 4 if entry.value in outlined else alpha
        rgb[mask] = (1 - fill) * rgb[mask] + fill * color
        if entry.value in outlined:
            rgb[_boundary(mask)] = color
    return rgb.astype(np.uint8)


def _text(draw, xy: tuple[int, int], text: str, font, anchor: str, fill=(230, 230, 230), **style) -> None:
    """``draw.text`` anchored where the font allows it (older bitmap fonts take no anchor)."""
    try:
        draw.text(xy, text, fill=fill, font=font, anchor=anchor, **style)
    except (TypeError, ValueError):
        draw.text(xy, text, fill=fill, font=font)


def _letters(draw, box: tuple[int, int, int, int], letters: tuple[str, str, str, str], font) -> None:
    """Orientation letters (left, top, right, bottom) at the middle of each side of ``box``."""
    x0, y0, x1, y1 = box
    spots = ((x0 + 4, (y0 + y1) // 2, "lm"), ((x0 + x1) // 2, y0 + 3, "mt"),
             (x1 - 4, (y0 + y1) // 2, "rm"), ((x0 + x1) // 2, y1 - 3, "mb"))
    for text, (x, y, anchor) in zip(letters, spots):
        _text(draw, (x, y), text, font, anchor, fill=(255, 255, 0), stroke_width=2, stroke_fill=(0, 0, 0))


def overview_png(ct: np.ndarray, labels: np.ndarray, key: Sequence[KeyEntry], path: Path,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "",
                 notice: str = NOT_FOR_CLINICAL_USE, window: tuple[float, float] = (-1000.0, 400.0),
                 alpha: float = 0.45, outline_above: float = 0.15, tile_height: int = 256,
                 overwrite: bool = True) -> Path:
    """Save the overview picture of ``ct`` with ``labels`` overlaid as a PNG (written atomically).

    Args:
        ct: the CT, (L, P, S) axes (see :func:`to_lps_axes`).
        labels: the label map on the same grid and axes.
        key: the labels to colour and name in the key (values absent from ``labels`` are listed too).
        path: the PNG to write.
        spacing: voxel spacing along L, P, S in mm (see :func:`lps_spacing`): every slice is drawn
            at one physical scale.
        title: a line above the slices.
        notice: the line in the warning band (empty: no band).
        window: the CT grey window (low, high) in HU.
        alpha: the opacity of a label's fill.
        outline_above: a label covering more than this fraction of the volume is outlined
            (with a faint fill) instead of filled.
        tile_height: the height in pixels of the tallest slice.
        overwrite: replace an existing ``path``.
    """
    from PIL import Image, ImageDraw

    lo, hi = window
    gray = np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    labels = np.asarray(labels)
    outlined = {e.value for e in key if (labels == e.value).mean() > outline_above}
    sx, sy, sz = (float(s) for s in spacing)
    nx, ny, nz = labels.shape
    mm = tile_height / max(ny * sy, nz * sz)  # pixels per millimetre
    axial_size = (max(1, round(nx * sx * mm)), max(1, round(ny * sy * mm)))
    coronal_size = (max(1, round(nx * sx * mm)), max(1, round(nz * sz * mm)))
    tiles: list[tuple[np.ndarray, tuple[str, str, str, str], str]] = []
    axial = [min(nz - 1, int(frac * nz)) for frac in (0.25, 0.5, 0.75)]
    for z in axial:
        tiles.append((_render(gray[:, :, z].T, labels[:, :, z].T, key, outlined, axial_size, alpha),
                      ("R", "A", "L", "P"), axial_caption(z, nz)))
    j = ny // 2
    tiles.append((_render(gray[:, j, :].T[::-1], labels[:, j, :].T[::-1], key, outlined, coronal_size, alpha),
                  ("R", "S", "L", "I"), coronal_caption(j, ny)))

    font, small = _font(16), _font(13)
    gap, margin = 6, 8
    band = 28 if notice else 0
    header = 24 if title else 0
    caption = 18
    row_h = max(t[0].shape[0] for t in tiles)
    width = sum(t[0].shape[1] for t in tiles) + gap * (len(tiles) - 1) + 2 * margin
    key_rows = _key_layout(key, outlined, width - 2 * margin, small)
    height = band + header + caption + row_h + margin + 22 * len(key_rows) + margin
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if notice:
        draw.rectangle((0, 0, width, band - 1), fill=(170, 0, 0))
        _text(draw, (margin, band // 2), notice, font, "lm", fill=(255, 255, 255))
    if title:
        _text(draw, (margin, band + header // 2), title, small, "lm")
    x, top = margin, band + header + caption
    for n, (rgb, letters, name) in enumerate(tiles):
        h, w = rgb.shape[:2]
        canvas.paste(Image.fromarray(rgb), (x, top))
        _text(draw, (x, top - caption // 2), name, small, "lm", fill=(200, 200, 200))
        if n == len(tiles) - 1:  # the coronal slice: where the axial slices cut it
            for z in axial:
                _dashed(draw, x, x + w, top + int((nz - 1 - z + 0.5) * h / nz), AXIAL_LINE)
        else:  # each axial slice: where the coronal slice cuts it
            _dashed(draw, x, x + w, top + int((j + 0.5) * h / ny), CORONAL_LINE)
        _letters(draw, (x, top, x + w, top + h), letters, font)
        x += w + gap
    y = top + row_h + margin
    for row in key_rows:
        for x, entry, label in row:
            box = (x, y + 3, x + 14, y + 17)
            if entry.value in outlined:
                draw.rectangle(box, outline=entry.color, width=3)
            else:
                draw.rectangle(box, fill=entry.color)
            _text(draw, (x + 20, y + 10), label, small, "lm")
        y += 22
    with atomic_output(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _key_layout(key: Sequence[KeyEntry], outlined: set[int], width: int, font) -> list[list[tuple[int, KeyEntry, str]]]:
    """The key's entries placed in rows of at most ``width`` pixels: (x, entry, text) per entry."""
    rows: list[list[tuple[int, KeyEntry, str]]] = [[]]
    x = 8
    for entry in key:
        text = f"{entry.value} {entry.name}" + (" (outline)" if entry.value in outlined else "")
        left, _, right, _ = font.getbbox(text)
        w = 20 + (right - left) + 18
        if rows[-1] and x + w > width:
            rows.append([])
            x = 8
        rows[-1].append((x, entry, text))
        x += w
    return rows if rows[0] else []
