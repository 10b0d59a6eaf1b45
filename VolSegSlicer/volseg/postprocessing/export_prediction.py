"""The way back, on the device the probabilities are on: network-grid probabilities -> input-grid label map.

Only the label map (uint8 when every label value fits, else int32, made uint16 on the host)
leaves the device. Per class group (sized from the device's free memory):

1. the preprocessing steps after a leading ``Spacing`` (crop -> pad, orientation -> flips and
   permutations, axis swaps) are undone by MONAI's own inverses on the device, on the network's
   grid (small);
2. the ``Spacing`` is undone by :class:`volseg.preprocessing.resampling.GridResampler` in slabs of
   the input grid: separable float32 linear (two taps per axis) or spline (one matrix per axis)
   interpolation when the mapping is axis-aligned, ``grid_sample`` with a float32 grid when it
   is oblique;
3. each slab's argmax (softmax cards; a running maximum and winner carry it across groups, the
   first of equal maxima winning as ``torch.argmax``) or thresholds (sigmoid cards, painted in
   card order) is taken on the device.

Cards whose preprocessing has no ``Spacing`` first are undone whole by MONAI's inverses (all
integer index operations) on the device, group by group. A resampling without a fast path
(``nearest``, reflection padding, an oblique spline) raises :class:`UnsupportedResampling`; the
caller then uses the exact path (:func:`volseg.postprocessing.to_input_grid.invert_to_labelmap`).

Against that exact path (MONAI's float64 resampling) the probabilities differ by about 1e-7, so
label maps differ only where the top two classes are that close (tests:
``Testing/python/test_export_prediction.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Spacing
from monai.utils import TraceKeys

from volseg.cards import Label
from volseg.memory import available_memory, gpu_available_bytes
from volseg.preprocessing.card_steps import Preprocessed, invert_partial
from volseg.preprocessing.resampling import GridResampler, UnsupportedResampling

__all__ = ["UnsupportedResampling", "WayBackMemory", "device_free_memory", "export_labelmap", "labelmap_on_input_grid",
           "plan_sizes", "probabilities_on_input_grid", "way_back_gpu_bytes"]

#: Share of the free memory of the device the way back may use.
FREE_FRACTION = 0.5
#: Upper bound on the CPU for the group and slab temporaries together (the exact path used 1 GiB).
CPU_BUDGET = 768 * 2**20
#: Upper bound on a GPU: larger pieces are no faster there, and a 16-class 512x512x800 CT must fit
#: in 7 GB with the probabilities themselves (issue 15).
GPU_BUDGET = 5 * 2**30


def device_free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: what this process can still allocate on a CUDA GPU (its free memory,
    torch's cached blocks, a per-process cap), the available RAM on the CPU (4 GiB when unknown)."""
    if device.type == "cuda":
        return gpu_available_bytes(device)
    free = available_memory()
    return int(free) if free is not None else 4 * 2**30


def _budget(device: torch.device) -> int:
    free = device_free_memory(device)
    budget = int(FREE_FRACTION * free)
    return min(budget, CPU_BUDGET if device.type == "cpu" else GPU_BUDGET)


@dataclass(frozen=True)
class Plan:
    """Classes per group and input-grid rows per slab."""

    group: int
    slab_rows: int


def plan_sizes(channels: int, network_voxels: int, input_shape: Sequence[int], budget: int,
               slab_bytes_per_voxel_channel: int = 16) -> Plan:
    """Split ``budget`` bytes between a class group (its network-grid copy and MONAI's inverse
    temporaries: 3 x 4 bytes per voxel and class) and a slab of the input grid (about
    ``slab_bytes_per_voxel_channel`` bytes per voxel and class, for the resampling's intermediates).

    Half the budget goes to the group, half to the slab; at least one class and one row.
    """
    per_class = 12 * max(1, network_voxels)
    group = int(max(1, min(channels, (budget // 2) // per_class)))
    row = int(np.prod(input_shape[1:])) * group * slab_bytes_per_voxel_channel
    slab_rows = int(max(1, min(input_shape[0], (budget // 2) // max(1, row))))
    return Plan(group, slab_rows)


def _spacing_record(partial) -> dict:
    record = partial.applied_operations[-1]
    extra = record[TraceKeys.EXTRA_INFO]
    return {"dst_affine": np.asarray(torch.as_tensor(extra["src_affine"]).cpu(), dtype=np.float64),
            "size": tuple(int(s) for s in record[TraceKeys.ORIG_SIZE]),
            "mode": extra["mode"], "padding": extra["padding_mode"],
            "align_corners": extra.get("align_corners")}


class _Undo:
    """Undo ``pre`` for one class group on ``device``: ``slab(rows)`` gives the group's values there."""

    def __init__(self, probs: torch.Tensor, channels: Sequence[int], pre: Preprocessed, device: torch.device) -> None:
        part = probs if list(channels) == list(range(probs.shape[0])) else probs[list(channels)]
        spacing_first = bool(pre.transforms) and isinstance(pre.transforms[0], Spacing)
        self.resampler: GridResampler | None = None
        if spacing_first:
            partial = invert_partial(part, pre, keep_first=1, device=device)
            rec = _spacing_record(partial)
            if rec["align_corners"] not in (False, TraceKeys.NONE, None):
                raise UnsupportedResampling("Spacing with align_corners=True has no fast path")
            src_affine = np.asarray(partial.affine.cpu(), dtype=np.float64)
            mapping = np.linalg.solve(src_affine, rec["dst_affine"])
            self.resampler = GridResampler(mapping, partial.shape[1:], rec["size"], rec["mode"], rec["padding"], device)
            self.values = partial.as_tensor()
        else:
            self.values = torch.as_tensor(invert_partial(part, pre, device=device)).float()
        self.shape = pre.input_shape
        if not spacing_first and tuple(self.values.shape[1:]) != tuple(self.shape):
            raise RuntimeError(f"inverting the preprocessing gave shape {tuple(self.values.shape[1:])}, "
                               f"expected {tuple(self.shape)}")

    def slab(self, rows: slice) -> torch.Tensor:
        if self.resampler is None:
            return self.values[:, rows]
        return self.resampler.slab(self.values, rows)


def _label_table(labels: Sequence[Label], channels: int, device: torch.device) -> tuple[torch.Tensor, torch.dtype]:
    """channel -> label value (0 for channels without a label), uint8 when every value fits."""
    dtype = torch.uint8 if max([lab.value for lab in labels] + [0]) <= 255 else torch.int32
    table = torch.zeros(max(channels, 1 + max([lab.channel for lab in labels] + [0])), dtype=dtype)
    for lab in labels:
        table[lab.channel] = lab.value
    return table.to(device), dtype


def export_labelmap(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                    threshold: float = 0.5, *, device: torch.device | None = None, budget: int | None = None,
                    on_step: Callable[[], None] | None = None) -> np.ndarray:
    """(C, I', J', K') probabilities on the preprocessed grid -> (I, J, K) uint16 label map on the input grid.

    Args:
        probs: the network's probabilities, on any device (moved to ``device`` one group at a time).
        pre: the preprocessing to undo.
        labels: the card's labels (value, channel).
        activation: ``"softmax"`` (argmax; channels without a label give 0) or ``"sigmoid"``
            (each label where its channel exceeds ``threshold``, in card order, later on top).
        threshold: the sigmoid threshold.
        device: where to work (default: ``probs``' device).
        budget: bytes of temporaries allowed (default: a share of the device's free memory).
        on_step: called between slabs (a cancel check).

    Returns:
        The label map, uint16, on the host.

    Raises:
        UnsupportedResampling: the card's resampling has no fast path (use the exact path).
        torch.OutOfMemoryError: the budget was too large for the device (the caller retries smaller).
    """
    device = device or probs.device
    budget = budget or _budget(device)
    channels = probs.shape[0]
    shape = tuple(pre.input_shape)
    sigmoid = activation != "softmax"
    order = [lab.channel for lab in labels] if sigmoid else list(range(channels))
    plan = plan_sizes(len(order), int(np.prod(pre.image.shape[1:])), shape, budget)
    groups = [order[i:i + plan.group] for i in range(0, len(order), plan.group)]
    table, dtype = _label_table(labels, channels, device)
    out = torch.zeros(shape, dtype=dtype, device=device)
    slabs = [slice(s, min(shape[0], s + plan.slab_rows)) for s in range(0, shape[0], plan.slab_rows)]
    first = _Undo(probs, groups[0], pre, device)
    if not sigmoid and first.resampler is not None and first.resampler.convex:
        first = _softmax_by_cells(probs, pre, groups, first, slabs, table, out, device, budget, on_step)
    if first is not None:
        _by_slabs(probs, pre, labels, sigmoid, threshold, groups, first, slabs, table, out, device, on_step)
    return out.cpu().numpy().astype(np.uint16, copy=False)


def _by_slabs(probs, pre, labels, sigmoid, threshold, groups, first, slabs, table, out, device, on_step) -> None:
    """Every class resampled on every voxel of each slab, then argmax / thresholds (splines, oblique
    mappings, sigmoid cards, cards without ``Spacing``)."""
    shape = out.shape
    single = len(groups) == 1
    best = winner = None
    if not sigmoid and not single:
        best = torch.empty(shape, dtype=torch.float32, device=device)
        winner = torch.zeros(shape, dtype=torch.uint8 if probs.shape[0] <= 256 else torch.int32, device=device)
    values_of = {lab.channel: lab.value for lab in labels}
    for g, group in enumerate(groups):
        undo = first if g == 0 else _Undo(probs, group, pre, device)
        for rows in slabs:
            if on_step is not None:
                on_step()
            values = undo.slab(rows)
            if sigmoid:
                view = out[rows]
                for k, channel in enumerate(group):
                    view[values[k] > threshold] = values_of[channel]
            elif single:
                out[rows] = table[torch.max(values, dim=0).indices]  # the first of equal maxima
            else:
                top, index = torch.max(values, dim=0)
                index = index + group[0]
                if g == 0:
                    best[rows], winner[rows] = top, index.to(winner.dtype)
                else:
                    better = top > best[rows]  # strict: an earlier class keeps a tie
                    winner[rows] = torch.where(better, index.to(winner.dtype), winner[rows])
                    best[rows] = torch.maximum(best[rows], top)
            del values
        del undo
        first = None
    if winner is not None:
        del best
        for rows in slabs:
            out[rows] = table[winner[rows].long()]


#: Above this share of voxels near a class boundary, interpolating every voxel separably is cheaper.
MIXED_SHARE = 0.12
#: Bytes per listed boundary voxel: its (i, j, k) int64 index.
POINT_BYTES = 24


def point_chunk_bytes(group: int) -> int:
    """Temporaries per boundary voxel interpolated at once (``GridResampler.point_values`` for a
    group of ``group`` classes, then its argmax): the 8 corners' flat int64 indices and float32
    weights and their broadcast intermediates (~200 bytes), the gathered corner values and the
    result (36 bytes per class)."""
    return 200 + 36 * group


@dataclass(frozen=True)
class WayBackMemory:
    """Bytes the way back holds on its device at most (:func:`way_back_gpu_bytes`)."""

    plan: Plan
    budget: int
    probabilities: int  # the network's output, already there
    labelmap: int  # the result on the input grid
    temporaries: int  # the larger of the two strategies' working sets
    total: int


def way_back_gpu_bytes(channels: int, network_shape: Sequence[int], input_shape: Sequence[int], free: int,
                       label_bytes: int = 1) -> WayBackMemory:
    """The way back's peak memory on a GPU that gives this run ``free`` bytes in all, as
    :func:`export_labelmap` sizes it (softmax card, a leading ``Spacing``): after inference the
    probabilities (and the network's input) occupy part of ``free``; the budget is
    :data:`FREE_FRACTION` of the rest, at most :data:`GPU_BUDGET`; on top of the budget's group and
    slab pieces each strategy keeps whole-grid arrays of its own:

    * by cells: the source grid's running maximum / winner and ``torch.max``'s outputs (20 bytes
      per network voxel) and the boundary list (within half the budget);
    * by slabs: the running maximum and winner on the input grid (5 bytes per input voxel).
    """
    n_net, n_in = int(np.prod(network_shape)), int(np.prod(input_shape))
    probabilities = channels * n_net * 4
    image = n_net * 4  # the network's (one-channel) input, still referenced
    labelmap = n_in * label_bytes
    budget = min(int(FREE_FRACTION * max(0, free - probabilities - image)), GPU_BUDGET)
    plan = plan_sizes(channels, n_net, input_shape, budget)
    by_cells = budget + 20 * n_net + n_net  # the pieces, the source-grid argmax, its uint8 copy
    by_slabs = budget + 5 * n_in
    temporaries = max(by_cells, by_slabs)
    return WayBackMemory(plan, budget, probabilities, labelmap, temporaries,
                         probabilities + image + labelmap + temporaries)


def _softmax_by_cells(probs, pre, groups, first, slabs, table, out, device, budget, on_step) -> _Undo | None:
    """Softmax cards whose way back is convex (linear, border padding, axis-aligned): a voxel whose
    2x2x2 source cell has one winning class at every corner takes that class (a convex combination
    keeps the winner, the first of equal maxima included); only the other voxels -- near class
    boundaries -- are interpolated, class group by class group, and compared."""
    resampler = first.resampler
    winner_src = None
    best_src = None
    for g, group in enumerate(groups):  # pass 1: the winning class on the source grid
        undo = first if g == 0 else _Undo(probs, group, pre, device)
        undo.values = undo.values.permute(1, 2, 3, 0).contiguous()  # channels last: one row per corner
        top, index = torch.max(undo.values, dim=-1)
        index = (index + group[0]).to(torch.int32)
        if winner_src is None:
            best_src, winner_src = top, index
        else:
            better = top > best_src
            winner_src = torch.where(better, index, winner_src)
            best_src = torch.maximum(best_src, top)
        del undo
    if len(groups) > 1:  # one group's copy at a time: the first is made again in pass 2
        first = None
    del best_src
    small = winner_src.to(torch.uint8) if probs.shape[0] <= 256 else winner_src
    boundary = []
    # the listed voxels (and their concatenation) stay within half the budget, and a share of the grid
    most = int(min(MIXED_SHARE * out.numel(), (budget // 2) // (2 * POINT_BYTES)))
    listed = 0
    for rows in slabs:  # uniform cells take their class; the rest are listed
        if on_step is not None:
            on_step()
        lmin, lmax = resampler.cell_extremes(small, rows)
        mixed = lmin != lmax
        out[rows] = table[lmin.long()]
        points = mixed.nonzero()
        del lmin, lmax, mixed
        listed += points.shape[0]
        if listed > most:  # so many boundary voxels that interpolating every voxel is cheaper
            del points, boundary
            return _Undo(probs, groups[0], pre, device) if first is None else _channels_first(first)
        points[:, 0] += rows.start
        boundary.append(points)
    points = torch.cat(boundary) if boundary else torch.zeros((0, 3), dtype=torch.int64, device=device)
    del boundary
    if points.shape[0] == 0:
        return None
    chunk = max(1, (budget // 2) // point_chunk_bytes(max(len(g) for g in groups)))
    best = torch.empty(points.shape[0], dtype=torch.float32, device=device)
    winner = torch.empty(points.shape[0], dtype=torch.int32, device=device)
    for g, group in enumerate(groups):  # pass 2: interpolate the listed voxels
        if first is not None:
            undo = first
        else:
            undo = _Undo(probs, group, pre, device)
            undo.values = undo.values.permute(1, 2, 3, 0).contiguous()
        for start in range(0, points.shape[0], chunk):
            if on_step is not None:
                on_step()
            part = slice(start, min(points.shape[0], start + chunk))
            top, index = torch.max(resampler.point_values(undo.values, points[part]), dim=1)
            index = (index + group[0]).to(torch.int32)
            if g == 0:
                best[part], winner[part] = top, index
            else:
                better = top > best[part]  # strict: an earlier class keeps a tie
                winner[part] = torch.where(better, index, winner[part])
                best[part] = torch.maximum(best[part], top)
        del undo
        first = None
    out[points[:, 0], points[:, 1], points[:, 2]] = table[winner.long()]
    return None


def _channels_first(undo: _Undo) -> _Undo:
    undo.values = undo.values.permute(3, 0, 1, 2).contiguous()
    return undo

def labelmap_on_input_grid(probs: torch.Tensor, pre: Preprocessed, labels: Sequence[Label], activation: str,
                           threshold: float = 0.5, *, device: torch.device | None = None,
                           warn: Callable[[str], None] | None = None,
                           on_step: Callable[[], None] | None = None) -> tuple[np.ndarray, str]:
    """:func:`export_labelmap` with its fallbacks; returns the label map and a sentence saying what ran.

    Order: the fast path on ``device`` with a share of its free memory; out of memory there,
    smaller groups and slabs (a quarter, then a sixteenth of the budget); then the fast path on
    the CPU (each step down reported through ``warn``). A card whose resampling has no fast path
    takes the exact path (:func:`volseg.postprocessing.to_input_grid.invert_to_labelmap`) on the CPU.
    """
    device = device or probs.device
    if device.type != "cpu":
        budget = _budget(device)
        for share in (1, 4, 16):
            try:
                return (export_labelmap(probs, pre, labels, activation, threshold, device=device,
                                        budget=budget // share, on_step=on_step),
                        f"the way back ran on {device}" + (f" in smaller pieces (1/{share} of the budget)" if share > 1 else ""))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                if warn is not None:
                    warn(f"out of GPU memory undoing the preprocessing on {device} with 1/{share} of the budget; "
                         + ("trying smaller class groups and slabs" if share < 16 else "mapping back on the CPU"))
            except UnsupportedResampling as exc:
                return _exact(probs, pre, labels, activation, threshold, exc, warn)
        probs = probs.cpu()
        try:
            return (export_labelmap(probs, pre, labels, activation, threshold, device=torch.device("cpu"),
                                    on_step=on_step), "the way back ran on the CPU after running out of GPU memory")
        except UnsupportedResampling as exc:
            return _exact(probs, pre, labels, activation, threshold, exc, warn)
    try:
        return (export_labelmap(probs, pre, labels, activation, threshold, device=device, on_step=on_step),
                "the way back ran on the CPU")
    except UnsupportedResampling as exc:
        return _exact(probs, pre, labels, activation, threshold, exc, warn)


def _exact(probs, pre, labels, activation, threshold, reason, warn) -> tuple[np.ndarray, str]:
    from volseg.postprocessing.to_input_grid import invert_to_labelmap

    labelmap = invert_to_labelmap(probs.cpu(), pre, labels, activation, threshold)
    return labelmap, f"the way back took MONAI's exact path on the CPU ({reason})"


def probabilities_on_input_grid(probs: torch.Tensor, pre: Preprocessed, *, device: torch.device | None = None,
                                budget: int | None = None) -> torch.Tensor:
    """(C, I', J', K') probabilities -> (C, I, J, K) float32 on the host, undone on ``device`` class
    group by class group and slab by slab (``--probabilities``: every class is written anyway).

    Within 1e-4 of MONAI's exact path (linear; 1e-3 for splines). Raises
    :class:`UnsupportedResampling` like :func:`export_labelmap`.
    """
    device = device or probs.device
    budget = budget or _budget(device)
    channels = probs.shape[0]
    shape = tuple(pre.input_shape)
    plan = plan_sizes(channels, int(np.prod(pre.image.shape[1:])), shape, budget)
    out = torch.empty((channels, *shape), dtype=torch.float32)
    for start in range(0, channels, plan.group):
        group = list(range(start, min(channels, start + plan.group)))
        undo = _Undo(probs, group, pre, device)
        for s in range(0, shape[0], plan.slab_rows):
            rows = slice(s, min(shape[0], s + plan.slab_rows))
            out[group[0]:group[-1] + 1, rows] = undo.slab(rows).cpu()
        del undo
    return out
