"""The path of a volume: read, preprocess, infer, postprocess, write.

:func:`segment` is what ``volseg segment`` and the Slicer module run. Every step reports a
stage to the :class:`~volseg.progress.Reporter`; a cancel request (SIGINT/SIGTERM in the CLI)
is honoured between windows and between stages, and since every write is atomic a cancelled
or failed run leaves no output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import __version__, models, signals
from volseg.cards import ModelCard
from volseg.checkpoints.reading import read_checkpoint
from volseg.inference.devices import resolve_device
from volseg.errors import Cancelled, CheckpointError, ResourceError, VolSegError, output_error
from volseg.inference.sliding_window import (
    InferenceOptions,
    count_windows,
    predict_with_fallback,
    whole_volume_options,
)
from volseg.io import (
    check_not_an_input,
    check_segmentation_output,
    commit_file,
    read_inputs,
    segmentation_outputs,
    write_probabilities,
    write_segmentation,
)
from volseg.io.staging import make_stage
from volseg.memory import available_memory
from volseg.postprocessing.labels import postprocess, to_labelmap
from volseg.preprocessing.card_steps import invert, invert_labels_nearest, preprocess
from volseg.preprocessing.planning import check_preprocessing, plan_preprocessing, planned_shape
from volseg.progress import Reporter
from volseg.request import (  # noqa: F401  (part of this module's API since before volseg.request)
    Overrides,
    SegmentRequest,
    check_probabilities_output,
    check_request,
    checkpoint_for,
)
from volseg.postprocessing.to_input_grid import all_finite, invert_to_labelmap
from volseg.postprocessing.export_prediction import (
    UnsupportedResampling,
    labelmap_on_input_grid,
    probabilities_on_input_grid,
)


def exact_stages() -> bool:
    """``$VOLSEG_EXACT_STAGES=1``: the way in and the way back take MONAI's exact CPU path (float64
    resampling) instead of volseg's torch path on the run's device (the benchmark's baseline)."""
    return os.environ.get("VOLSEG_EXACT_STAGES", "") not in ("", "0")


def is_device_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the GPU itself failed (lost, reset, an illegal access, a driver error)."""
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or (
        isinstance(exc, RuntimeError) and any(k in text for k in ("CUDA error", "CUDA driver", "cuDNN error",
                                                                   "CUBLAS_STATUS", "device-side assert")))


@contextlib.contextmanager
def device_failures(device: torch.device):
    """A GPU that fails mid-run becomes one clear :class:`ResourceError` (exit 3) naming ``device``;
    nothing has been written yet, so nothing is left behind. Running out of memory is not a
    failure of the device (the stages step down instead)."""
    try:
        yield
    except (VolSegError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - only device failures are translated, the rest re-raised
        if not is_device_failure(exc):
            raise
        raise ResourceError(
            f"the GPU ({device}) failed during the run: {' '.join(str(exc).split())[:200]}",
            hint="no output was written; check the GPU (nvidia-smi), then run again, or use --device cpu",
        ) from None


class ModelCache:
    """Keeps loaded networks between requests (``volseg serve``); keyed by card, file and mtime."""

    def __init__(self) -> None:
        self._models: dict[tuple, torch.nn.Module] = {}

    def get(self, key: tuple) -> torch.nn.Module | None:
        return self._models.get(key)

    def put(self, key: tuple, model: torch.nn.Module) -> None:
        self._models = {key: model}  # one model at a time: GPU memory is the scarce resource


def load_model(card: ModelCard, checkpoint: Path, trust_pickle: bool = False) -> torch.nn.Module:
    """Read the checkpoint and build the card's network around it (strict, eval mode)."""
    ckpt = read_checkpoint(checkpoint, trust_pickle=trust_pickle, sha256=card.checkpoint_sha256)
    if card.is_torchscript or ckpt.format == "torchscript":
        if ckpt.module is None:
            raise CheckpointError(f"the card {card.id!r} expects a TorchScript file but {checkpoint} holds a state_dict",
                                  hint=f"use a card with an architecture, or `volseg inspect {checkpoint}`")
        return ckpt.module.eval()
    check_output_count(card, models.implied_out_channels(card.architecture, ckpt.state_dict))
    return models.load(card.architecture, ckpt.state_dict, **card.config)


def check_output_count(card: ModelCard, found: int | None) -> None:
    """Refuse a checkpoint whose output layer has another channel count than the card (or
    ``--num-labels``) describes, from the state dict's shapes, before any image work.

    Args:
        card: the run's card (or the one ``--arch`` made: its message speaks of ``--num-labels``).
        found: the output channel count the checkpoint's shapes imply (None: cannot tell).
    """
    if found is None or found == card.out_channels:
        return
    sigmoid = card.activation == "sigmoid"
    per_label = "one channel per label" if sigmoid else "a background channel plus one per label"
    if card.from_arguments:  # --arch NAME --num-labels N, no card
        labels = found if sigmoid else found - 1
        raise CheckpointError(
            f"the checkpoint's output layer has {found} channels, but --num-labels {len(card.labels)} gives "
            f"{card.out_channels} for {card.architecture} ({per_label})",
            hint=f"pass --num-labels {labels}" if labels >= 1 else "check that the checkpoint is a segmentation network",
        )
    raise CheckpointError(
        f"the checkpoint's output layer has {found} channels, but the card {card.id!r} describes {card.out_channels} "
        f"({len(card.labels)} labels, {per_label})",
        hint="use the checkpoint the card was written for, or a card whose labels (or output.channels) match it; "
        "`volseg inspect CHECKPOINT` shows what the checkpoint holds",
    )


def inference_options(card: ModelCard, o: Overrides, shape: Sequence[int] | None = None) -> InferenceOptions:
    """The card's inference settings with the user's overrides applied; for a whole-volume card
    (``inference.whole_volume``) one window the size of the preprocessed grid ``shape`` (refused when
    the network cannot take it), unless ``--roi-size`` asks for windows."""
    s = card.inference
    if s.whole_volume and o.roi_size:
        s = replace(s, whole_volume=False)
    elif s.whole_volume and shape is not None:
        s = whole_volume_options(s, shape)
    return replace(
        s,
        roi_size=tuple(o.roi_size or s.roi_size),
        overlap=s.overlap if o.overlap is None else o.overlap,
        sw_batch_size=o.sw_batch_size or s.sw_batch_size,
        sw_batch_auto=s.sw_batch_auto and not o.sw_batch_size,  # --sw-batch-size fixes the GPU's window batch
        flips=s.flips if o.flips in (None, True) else (),
        amp=(o.precision != "fp32") if o.precision else (s.amp if o.amp is None else o.amp),
        precision=o.precision or ("fp32" if o.amp is False else s.precision if o.amp is None else "auto"),
    )


def choose_network(model: torch.nn.Module, card: ModelCard, options: InferenceOptions, device: torch.device,
                   windows: int, reporter: Reporter, begin_stage=None) -> torch.nn.Module:
    """The network the windows run through: ``model``, or on the CPU an ONNX Runtime / OpenVINO
    compilation of it checked against it (:func:`volseg.inference.cpu_runtime.select_runtime`); says which and why.
    ``$VOLSEG_RUNTIME`` overrides the card's ``inference.runtime``.

    A conversion is its own stage, ``convert`` (``begin_stage(name, message)`` opens it; the
    export takes seconds and is not preprocessing), and what the exporter logs (torch's
    ``W1204 ...`` lines) becomes warning events instead of stderr lines."""
    runtime = os.environ.get("VOLSEG_RUNTIME") or options.runtime
    if runtime == "torch" or device.type != "cpu" or card.is_torchscript:
        return model
    from volseg.inference import cpu_runtime

    shape = (options.sw_batch_size, len(card.inputs), *options.roi_size)
    candidates, _ = cpu_runtime.runtime_candidates(card.architecture, shape, device, windows, runtime)
    if candidates and begin_stage is not None:
        begin_stage("convert", f"converting the network for {' or '.join(candidates)} (once per checkpoint and "
                    "window size, then cached)")
    network, reason = cpu_runtime.select_runtime(model, card.architecture, shape, device, windows, runtime,
                                                 select=options.select_output, log=reporter.log)
    reporter.log(f"CPU runtime: {reason}")
    return network


def _available_memory() -> int | None:
    return available_memory()


def estimate_memory(shape: Sequence[int], in_channels: int, out_channels: int, passes: int = 1,
                    roi_size: Sequence[int] | None = None, sw_batch_size: int = 1, streamed: bool = False) -> int:
    """Bytes the CPU needs for one run on a preprocessed grid of ``shape``: the input, the
    blended output and its weight map, the averaged probabilities and the label map (all on the
    grid padded up to the window), plus one batch of windows in and out. The network's own
    activations are not included: they depend on the architecture.

    ``streamed``: the estimate for the input grid when the label map is made piecewise
    (:func:`volseg.postprocessing.to_input_grid.invert_to_labelmap`): the input, the running maximum and
    winner, the label map and a margin for one class group's and one slab's temporaries (their
    absolute size is bounded, about 1 GiB)."""
    padded = [max(s, r) for s, r in zip(shape, roi_size or shape)]
    voxels = int(np.prod(padded))
    if streamed:
        return voxels * (4 * in_channels + 4 * 4 + 1 + 2)
    grid = voxels * 4 * (in_channels + 2 * out_channels + (out_channels if passes > 1 else 0) + 1) + voxels * 2
    if roi_size is None:
        return grid
    windows = count_windows(shape, roi_size, 0.0)
    batch = min(sw_batch_size, max(1, windows)) * int(np.prod(roi_size)) * 4 * (in_channels + out_channels)
    return grid + batch


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def check_memory(shape: Sequence[int], in_channels: int, out_channels: int, passes: int,
                 roi_size: Sequence[int] | None = None, sw_batch_size: int = 1, streamed: bool = False) -> None:
    need = estimate_memory(shape, in_channels, out_channels, passes, roi_size, sw_batch_size, streamed)
    free = _available_memory()
    if free is not None and need > 0.9 * free:
        raise ResourceError(
            f"this volume needs about {_size(need)} of memory after preprocessing "
            f"(grid {tuple(shape)}, {out_channels} output channels) but only {_size(free)} are available",
            hint="crop the volume to the region of interest, resample it coarser, or close other programs",
        )


def preprocess_on(device: torch.device, volume, card: ModelCard, reporter: Reporter):
    """The way in: the card's steps on the run's CUDA device, else on the CPU (torch, float32
    resampling), or MONAI's exact CPU path with ``$VOLSEG_EXACT_STAGES=1``. Out of GPU memory: the exact path on the CPU,
    with a warning."""
    if exact_stages():
        return preprocess(volume.array, volume.ijk_to_ras, card.preprocessing)
    if device.type != "cuda":  # CPU runs, and MPS (no float64 there for MONAI's intensity steps): the CPU
        device = torch.device("cpu")
    with device_failures(device):
        try:
            return preprocess(volume.array, volume.ijk_to_ras, card.preprocessing, device=device)
        except torch.OutOfMemoryError:
            if device.type == "cpu":
                raise
            torch.cuda.empty_cache()
    reporter.log(f"out of GPU memory preprocessing on {device}; preprocessing on the CPU", "warning")
    return preprocess(volume.array, volume.ijk_to_ras, card.preprocessing)


def _relay(caught: list, reporter: Reporter) -> None:
    """Report the library warnings caught so far as warning events (one line each), then forget them."""
    for w in caught:
        if issubclass(w.category, UserWarning):
            reporter.log(" ".join(str(w.message).split())[:500], "warning")
    caught.clear()


def segment(request: SegmentRequest, reporter: Reporter, cancel: threading.Event | None = None,
            cache: ModelCache | None = None) -> dict[str, Any]:
    """Run one segmentation end to end; returns the ``done`` event's payload.

    Warnings raised on the way (which DICOM series was used, what a library noticed) are
    reported as warning events at the next stage, never printed on stderr; other warning
    categories (deprecations) are silenced.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return _segment(request, reporter, cancel or threading.Event(), cache, lambda: _relay(caught, reporter))


def _segment(request: SegmentRequest, reporter: Reporter, cancel: threading.Event, cache: ModelCache | None,
             relay) -> dict[str, Any]:
    card, o = request.card, request.overrides
    signals.begin_run()

    def checkpoint_stage(name: str, message: str) -> None:
        relay()
        if cancel.is_set():
            raise Cancelled()
        reporter.stage(name, message)

    ckpt_path = check_request(request)  # everything that can be refused before any work
    outputs = segmentation_outputs(request.output) + ([request.probabilities] if request.probabilities else [])
    device, reason = resolve_device(request.device)
    reporter.log(f"device {device}: {reason}")
    if card.demonstration:
        reporter.log(f"model {card.id!r} is a demonstration model: not for clinical use", "warning")

    checkpoint_stage("read", f"reading {len(request.inputs)} input(s)")
    volume = read_inputs(list(request.inputs), expected_channels=len(card.inputs),
                         channel_names=[i.name for i in card.inputs])
    relay()  # e.g. "several DICOM series; using ..."
    check_segmentation_output(request.output, request.overwrite, reference=volume)  # e.g. .dcm needs DICOM input
    if volume.source is not None and volume.source.dicom_files:
        check_not_an_input(outputs, [], volume.source.dicom_files)
    check_memory(volume.spatial_shape, len(card.inputs), card.out_channels, 1,
                 streamed=request.probabilities is None)  # the input grid; the network's grid is checked below
    # Every preprocessing step's grid and memory, and the run's on the final grid, before any of it
    # is allocated (a card's Resize or Spacing can ask for gigabytes; see preprocessing/planning.py).
    plans = plan_preprocessing(volume.spatial_shape, volume.ijk_to_ras, card.preprocessing, len(card.inputs))
    check_preprocessing(plans)
    planned = inference_options(card, o, planned_shape(volume.spatial_shape, plans))
    check_memory(planned_shape(volume.spatial_shape, plans), len(card.inputs), card.out_channels,
                 1 + len(planned.flips), planned.roi_size, planned.sw_batch_size)

    checkpoint_stage("load_model", f"loading {card.id}")
    key = (card.id, str(card.path), card.architecture, json.dumps(card.config, sort_keys=True, default=str),
           str(ckpt_path.resolve()), ckpt_path.stat().st_mtime, request.trust_pickle)
    model = cache.get(key) if cache else None
    if model is None:
        model = load_model(card, ckpt_path, request.trust_pickle)
        if cache:
            cache.put(key, model)

    checkpoint_stage("preprocess", "preprocessing")
    pre = preprocess_on(device, volume, card, reporter)
    options = inference_options(card, o, pre.image.shape[1:])

    if getattr(model, "batch_dependent", False) and options.sw_batch_size > 1:
        reporter.log("this checkpoint's outputs depend on the other windows in a batch (DeformUX-Net repository-"
                     "source offsets); running windows one at a time so each gets its batch-1 output", "warning")
        options = replace(options, sw_batch_size=1, sw_batch_auto=False)
    check_memory(pre.image.shape[1:], len(card.inputs), card.out_channels, 1 + len(options.flips),
                 options.roi_size, options.sw_batch_size)
    windows = count_windows(pre.image.shape[1:], options.roi_size, options.overlap, options.mode) * (1 + len(options.flips))
    network = choose_network(model, card, options, device, windows, reporter, begin_stage=checkpoint_stage)
    checkpoint_stage("infer", f"inference: {windows} windows of {list(options.roi_size)} on {device}")
    ran: dict[str, Any] = {}
    with device_failures(device):  # the probabilities stay on the device for the way back
        probs, where = predict_with_fallback(network, pre.image, options, device, reporter, cancel, stats=ran)
    if not all_finite(probs):
        raise CheckpointError(
            "the network produced NaN or infinite values, so no segmentation was written",
            hint="the checkpoint may be corrupt or not match the card; on a GPU, try --precision fp32",
        )

    checkpoint_stage("postprocess", "postprocessing")
    # the way back runs where the probabilities are: the GPU, unless inference fell back to the CPU
    back = device if device.type == "cuda" and "on the CPU" not in where else torch.device("cpu")
    if card.postprocessing.invert == "labels_nearest":  # labels on the network's grid, mapped back as labels
        labelmap = invert_labels_nearest(to_labelmap(probs.cpu(), card.labels, card.activation, card.threshold), pre)
        probs = invert(probs.cpu(), pre) if request.probabilities is not None else None
    elif request.probabilities is None and exact_stages():
        labelmap = invert_to_labelmap(probs.cpu(), pre, card.labels, card.activation, card.threshold)
        probs = None
    elif request.probabilities is None:  # only the label map is wanted: the way back on the device

        def on_step() -> None:
            if cancel.is_set():
                raise Cancelled()

        with device_failures(back):
            labelmap, how = labelmap_on_input_grid(probs, pre, card.labels, card.activation, card.threshold,
                                                   device=back, warn=lambda m: reporter.log(m, "warning"),
                                                   on_step=on_step)
        reporter.log(how)
        probs = None
    elif exact_stages():
        probs = invert(probs.cpu(), pre)
        labelmap = to_labelmap(probs, card.labels, card.activation, card.threshold)
    else:  # --probabilities: every class on the input grid, undone on the device in float32
        with device_failures(back):
            try:
                probs = probabilities_on_input_grid(probs, pre, device=back)
            except (UnsupportedResampling, torch.OutOfMemoryError):
                probs = invert(probs.cpu(), pre)
        labelmap = to_labelmap(probs, card.labels, card.activation, card.threshold)
    p = card.postprocessing
    labelmap = postprocess(
        labelmap, card.labels, volume.spacing,
        keep_largest=p.keep_largest_component if o.keep_largest is None else o.keep_largest,
        holes=p.fill_holes if o.fill_holes is None else o.fill_holes,
        min_island_mm3=p.min_island_mm3 if o.min_island_mm3 is None else o.min_island_mm3,
    )

    checkpoint_stage("write", f"writing {request.output}")
    provenance = {"model": card.id, "title": card.title, "architecture": card.architecture,
                  "checkpoint": ckpt_path.name, "software": f"volseg {__version__}", "device": where}
    outputs = write_outputs(request, labelmap, probs, volume, provenance, cancel)
    present = sorted(int(v) for v in np.unique(labelmap) if v)
    relay()
    result = {"outputs": outputs, "device": str(device), "where": where, "precision": ran.get("precision"),
              "labels_present": present}
    reporter.done(**result)
    return result


def _in_user_terms(err: VolSegError, stages: dict[Path, Path]) -> VolSegError:
    """``err`` with every hidden staging folder in its text replaced by the user's folder."""
    for folder, user_folder in stages.items():
        err.message = err.message.replace(str(folder), str(user_folder))
        if err.hint:
            err.hint = err.hint.replace(str(folder), str(user_folder))
    err.args = (err.message,)
    return err


def write_outputs(request: SegmentRequest, labelmap: np.ndarray, probs: torch.Tensor | None, volume,
                  provenance: dict[str, Any], cancel: threading.Event | None = None) -> dict[str, Any]:
    """Write the segmentation (and the probabilities) as one group: every file is first written
    into a hidden staging folder beside its destination and moved into place only when all of
    them were written, so a failure (a full disk, no inodes, a read-only folder) or a cancel
    leaves none of them behind. Errors name the user's paths, never the staging folder.

    Once every file is written and no cancel arrived, the files are committed (moved into
    place without replacing a file that appeared meanwhile, unless ``--overwrite``): from that
    point a signal no longer cancels the run (:func:`volseg.signals.commit_point`).
    """
    stages: dict[Path, Path] = {}
    committed: list[Path] = []

    def staged(path: Path) -> Path:
        try:
            folder = make_stage(path.parent)
        except OSError as error:
            raise output_error(error, path) from None
        stages[folder] = path.parent
        return folder / path.name

    try:
        try:
            seg = write_segmentation(staged(request.output), labelmap, volume, request.card.labels,
                                     overwrite=False, provenance=provenance)
            moves = [(p, request.output.parent / p.name) for p in segmentation_outputs(seg)]
            outputs: dict[str, Any] = {"segmentation": str(request.output), "probabilities": None}
            if request.probabilities is not None:
                prob = write_probabilities(staged(request.probabilities), probs.numpy(), volume, overwrite=False,
                                           channel_names=request.card.channel_names())
                moves.append((prob, request.probabilities))
                outputs["probabilities"] = str(request.probabilities)
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            signals.commit_point()
            for source, target in moves:
                existed = target.exists()
                commit_file(source, target, request.overwrite)
                if not existed:
                    committed.append(target)
            return outputs
        except OSError as error:
            raise output_error(error, request.output) from None
        except VolSegError as err:
            raise _in_user_terms(err, stages) from None
    except BaseException:
        for path in committed:  # a later file could not be committed: take the group back
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        for folder in stages:
            shutil.rmtree(folder, ignore_errors=True)
