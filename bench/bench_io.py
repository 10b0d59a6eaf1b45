"""Benchmark reading and writing volumes per format through ``volseg.io``.

    python bench/bench_io.py [--quick] [--size I J K]

A synthetic CT-like int16 volume (default 256x256x128: body, lungs, bones, noise) and a
7-label uint8 label map on the same oblique grid are written and read back in each format:
NRRD (.nrrd), NIfTI (.nii.gz), MetaImage (.mha) with ``write_volume`` / ``read_volume``, and a
Slicer segmentation (.seg.nrrd, 7 segments with terminology) with ``write_segmentation`` /
``slicerio.read_segmentation``. Writes are compressed (gzip) as volseg writes them. The baseline
is the NRRD read. Every read is checked: voxels equal to what was written and, for volumes,
the same grid. A failed check makes the script exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column
from volseg.io import Volume, read_volume, write_segmentation, write_volume

VOLUME_SUFFIXES = {"NRRD": ".nrrd", "NIfTI": ".nii.gz", "MHA": ".mha"}


@dataclass(frozen=True)
class Segment:
    """What ``write_segmentation`` needs of a label (the fields of ``volseg.cards.Label``)."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict[str, list[str]] | None = None


SEGMENTS = [
    Segment(1, "body", (177, 122, 101), {"category": ["SCT", "123037004", "Anatomical Structure"],
                                        "type": ["SCT", "38266002", "Entire body"]}),
    Segment(2, "right lung", (197, 165, 145), {"category": ["SCT", "123037004", "Anatomical Structure"],
                                              "type": ["SCT", "3341006", "Right lung"]}),
    Segment(3, "left lung", (197, 165, 145), {"category": ["SCT", "123037004", "Anatomical Structure"],
                                             "type": ["SCT", "44029006", "Left lung"]}),
    Segment(4, "spine", (241, 214, 145)),
    Segment(5, "heart", (206, 110, 84)),
    Segment(6, "aorta", (224, 97, 76)),
    Segment(7, "lesion", (255, 0, 0)),
]


def phantom(size: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(int16 CT-like image, uint8 label map with values 0..7), both of shape ``size``."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in size], indexing="ij", sparse=True)
    labels = np.zeros(size, np.uint8)
    image = np.full(size, -1000, np.float32)

    def paint(mask: np.ndarray, value: int, hu: float) -> None:
        mask = np.broadcast_to(mask, size)
        labels[mask] = value
        image[mask] = hu

    paint((i / 0.9) ** 2 + (j / 0.7) ** 2 <= 1, 1, 40)
    paint(((i - 0.4) / 0.3) ** 2 + (j / 0.45) ** 2 + (k / 0.9) ** 2 <= 1, 2, -850)
    paint(((i + 0.4) / 0.3) ** 2 + (j / 0.45) ** 2 + (k / 0.9) ** 2 <= 1, 3, -850)
    paint((i / 0.08) ** 2 + ((j - 0.5) / 0.08) ** 2 <= 1, 4, 700)
    paint(((i + 0.1) / 0.18) ** 2 + ((j + 0.1) / 0.2) ** 2 + ((k - 0.2) / 0.3) ** 2 <= 1, 5, 60)
    paint(((i - 0.05) / 0.05) ** 2 + ((j - 0.3) / 0.05) ** 2 <= 1, 6, 200)
    paint(((i - 0.45) / 0.12) ** 2 + (j / 0.12) ** 2 + ((k - 0.3) / 0.2) ** 2 <= 1, 7, 30)
    image += rng.normal(0, 15, size).astype(np.float32)
    return np.clip(image, -1024, 3071).astype(np.int16), labels


def reference_grid(array: np.ndarray) -> Volume:
    """An oblique grid (rotation about the k axis, 0.8 x 0.8 x 2.5 mm) so geometry round trips are tested."""
    a = np.deg2rad(10.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Volume(array=array, spacing=np.array([0.8, 0.8, 2.5]), origin=np.array([-102.4, -120.0, -160.0]),
                  direction=direction)


def _check_volume(read: Volume, written: Volume) -> str | None:
    if read.array.shape != written.array.shape or not np.array_equal(read.array, written.array):
        return "FAIL: voxels differ"
    diffs = written.grid_differences(read)
    return f"FAIL: grid differs ({diffs[0]})" if diffs else None


def _check_segmentation(seg: dict[str, Any], labels: np.ndarray) -> str | None:
    voxels = np.asarray(seg["voxels"])
    if voxels.shape != labels.shape or not np.array_equal(voxels, labels):
        return "FAIL: voxels differ"
    names = [s["name"] for s in seg["segments"]]
    if names != [s.name for s in SEGMENTS]:
        return f"FAIL: segments {names}"
    return None


def run(size: tuple[int, int, int] = (256, 256, 128), repeats: int = 3, warmup: int = 1,
        formats: tuple[str, ...] = ("NRRD", "NIfTI", "MHA", "seg.nrrd")) -> list[dict]:
    """Measure writes (interleaved), then reads (interleaved); return the table rows."""
    import slicerio

    image, labels = phantom(size)
    volume = reference_grid(image)
    with tempfile.TemporaryDirectory(prefix="volseg-bench-io-") as tmp:
        folder = Path(tmp)
        writes: list[tuple[str, Path, Callable[[], Any]]] = []
        reads: list[tuple[str, Path, Callable[[], Any], Callable[[Any], str | None]]] = []
        for fmt in formats:
            if fmt == "seg.nrrd":
                path = folder / "labels.seg.nrrd"
                writes.append((fmt, path, lambda p=path: write_segmentation(
                    p, labels, volume, SEGMENTS, overwrite=True, provenance={"model": "bench"})))
                reads.append((fmt, path, lambda p=path: slicerio.read_segmentation(str(p)),
                              lambda seg: _check_segmentation(seg, labels)))
            else:
                path = folder / f"image{VOLUME_SUFFIXES[fmt]}"
                writes.append((fmt, path, lambda p=path: write_volume(p, volume, overwrite=True)))
                reads.append((fmt, path, lambda p=path: read_volume(p), lambda v: _check_volume(v, volume)))
        write_t = common.measure_interleaved([(fn, "cpu") for _, _, fn in writes], repeats=repeats, warmup=warmup)
        read_t = common.measure_interleaved([(fn, "cpu") for _, _, fn, _ in reads], repeats=repeats, warmup=warmup)
        rows = []
        for (fmt, path, _, checker), timing in zip(reads, read_t):
            problem = checker(timing.result)
            rows.append(_row(fmt, "read", path, timing, problem))
        for (fmt, path, _), timing in zip(writes, write_t):
            rows.append(_row(fmt, "write", path, timing, None if path.exists() else "FAIL: no file"))
    rows.sort(key=lambda r: (r["op"] != "read" or r["format"] != "NRRD", formats.index(r["format"]), r["op"]))
    return rows


def _row(fmt: str, op: str, path: Path, timing: common.Timing, problem: str | None) -> dict:
    size = path.stat().st_size if path.exists() else None
    return {"name": f"{fmt} {op}", "format": fmt, "op": op, "file_mib": common.mib(size),
            **common.timing_fields(timing),
            "check": problem or ("ok (round trip exact)" if op == "read" else "ok"), "ok": problem is None}


COLUMNS = [Column("name", "format, operation"), Column("file_mib", "file MiB", "{:.2f}"), *common.TIMING_COLUMNS,
           Column("check", "check")]
BASELINE = "NRRD read"


def table(rows: list[dict]) -> str:
    return common.timing_table(rows, COLUMNS, baseline=BASELINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3, device=False,  # file I/O runs on the CPU
                           quick_help="one round, no warm-up, a 128x128x64 volume")
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                        help="volume size (default 256 256 128; 128 128 64 with --quick)")
    args, _ = common.start(parser, argv)
    size = tuple(args.size or ((128, 128, 64) if args.quick else (256, 256, 128)))
    print(f"volume: synthetic CT int16 {size} and a 7-label uint8 label map (volume in memory "
          f"{np.prod(size) * 2 / 2**20:.1f} MiB); {args.repeats} round(s), rows interleaved, median; "
          "CPU memory = peak RSS growth")
    print()
    rows = run(size, repeats=args.repeats, warmup=0 if args.quick else 1)
    print(table(rows))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
