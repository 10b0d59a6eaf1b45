"""The in-memory volume: voxels plus the exact grid they sit on.

A :class:`Volume` keeps the spatial axes in the file's own index order (i, j, k; i varies
fastest in the file, as ITK's x), so writing a result back onto the reference grid never needs
a resampling or an axis flip: only the voxel array changes, the grid is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

#: RAS = LPS with the first two axes negated.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Source:
    """Where a volume came from.

    Args:
        paths: the files read (one per channel, or the DICOM files of a series in slice order).
        format: "nifti" | "nrrd" | "mha" | "dicom" | another lower-case format name.
        dicom_files: for a DICOM series, the files in the order of index axis k.
    """

    paths: list[Path]
    format: str
    dicom_files: list[Path] | None = None
    series_description: str | None = None


@dataclass
class Volume:
    """Voxels and the physical grid they are defined on.

    Args:
        array: (C, I, J, K) for network inputs (the stored dtype when narrow and exact in float32,
            e.g. int16, else float32: ``readers.input_dtype``), (I, J, K) for a single image or a label
            map. Spatial axes are in the file's index order.
        spacing: (3,) voxel size in mm along i, j, k (> 0).
        origin: (3,) LPS position in mm of voxel (0, 0, 0).
        direction: (3, 3) LPS direction cosines; column a is the unit direction of index axis a.
        source: the files the volume was read from, if any.
    """

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    source: Source | None = field(default=None)

    def __post_init__(self) -> None:
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Volume array must be (I, J, K) or (C, I, J, K), got shape {self.array.shape}")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(I, J, K): the last three axes of ``array``."""
        i, j, k = self.array.shape[-3:]
        return int(i), int(j), int(k)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping voxel indices (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * self.spacing[np.newaxis, :]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping voxel indices to RAS mm (the NIfTI / MONAI affine)."""
        return LPS_TO_RAS @ self.ijk_to_lps

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid (spacing, origin, direction, source) holding ``array``.

        Raises:
            ValueError: when the spatial shape of ``array`` differs from this volume's.
        """
        if tuple(array.shape[-3:]) != self.spatial_shape:
            raise ValueError(
                f"with_array: spatial shape {tuple(array.shape[-3:])} differs from the grid {self.spatial_shape}"
            )
        return replace(
            self,
            array=array,
            spacing=self.spacing.copy(),
            origin=self.origin.copy(),
            direction=self.direction.copy(),
        )

    def grid_differences(self, other: Volume, tol: float = 1e-4) -> list[str]:
        """Human-readable differences between the grids of two volumes (empty when the same).

        Spacing and origin are compared with a tolerance of ``tol`` mm scaled by their
        magnitude, directions with ``tol`` absolute.
        """
        diffs = []
        if self.spatial_shape != other.spatial_shape:
            diffs.append(f"shape {self.spatial_shape} vs {other.spatial_shape}")
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol):
            diffs.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, rtol=tol, atol=tol):
            diffs.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm (LPS)")
        if not np.allclose(self.direction, other.direction, atol=tol):
            diffs.append(f"direction {_fmt(self.direction.ravel())} vs {_fmt(other.direction.ravel())}")
        return diffs

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        """Whether ``other`` has the same shape, spacing, origin and direction (within ``tol``)."""
        return not self.grid_differences(other, tol)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in np.asarray(values).ravel()) + ")"
