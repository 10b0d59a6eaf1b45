"""The way in in torch (volseg.preprocessing.on_device) against MONAI's exact CPU path.

Every built-in card's preprocessing on axis-aligned, flipped, anisotropic and oblique volumes:
the same grid (shape, affine, operation records), images within 1e-4 (linear) / 1e-3 (spline)
relative, and the way back from the fast way in gives the exact path's label map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Spacing

from test_export_prediction import CARDS, _affine, _compare, _ct, _probs
from volseg.cards import load_card
from volseg.postprocessing.export_prediction import export_labelmap
from volseg.postprocessing.to_input_grid import invert_to_labelmap
from volseg.preprocessing.card_steps import build_transforms, invert, preprocess
from volseg.preprocessing.on_device import resample_spacing, to_device


def _steps(card_id: str):
    card = load_card(card_id)
    steps = card.preprocessing
    if card_id == "segformer3d-brats":
        steps = [dict(s, args={"roi_size": [20, 24, 18]}) if s["name"] == "CenterSpatialCrop" else s for s in steps]
    return card, steps


def _tolerance(steps) -> float:
    spline = any(s["name"] == "Spacing" and isinstance(s["args"].get("mode"), int) for s in steps)
    return 1e-3 if spline else 1e-4


@pytest.mark.parametrize("card_id", CARDS)
@pytest.mark.parametrize("kind", ["axis", "flipped", "anisotropic", "oblique"])
def test_every_card_preprocesses_like_monai(card_id, kind):
    card, steps = _steps(card_id)
    array = np.repeat(_ct((40, 36, 22)), len(card.inputs), axis=0).astype(np.int16)  # as stored: int16 HU
    exact = preprocess(array.astype(np.float32), _affine(kind), steps)
    fast = preprocess(array, _affine(kind), steps, device=torch.device("cpu"))
    assert fast.image.shape == exact.image.shape and fast.image.dtype == torch.float32
    assert torch.allclose(fast.image.affine, exact.image.affine, atol=1e-9)
    scale = float(exact.image.abs().max())
    assert float((fast.image - exact.image).abs().max()) <= _tolerance(steps) * scale
    assert [op["class"] for op in fast.image.applied_operations] == [op["class"] for op in exact.image.applied_operations]
    # the way back from the fast way in: the exact path's labels
    probs = _probs(exact.image.shape[1:], card.out_channels, card.activation)
    reference = invert_to_labelmap(probs, exact, card.labels, card.activation, card.threshold)
    got = export_labelmap(probs, fast, card.labels, card.activation, card.threshold)
    _compare(got, reference, invert(probs, exact) if card.activation == "softmax" else None)


def test_spacing_record_inverts_with_monai():
    """The record resample_spacing writes is the one MONAI's own inverse consumes."""
    t = build_transforms([{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"}}])[0]
    image = to_device(_ct((30, 26, 18)), _affine("flipped"), torch.device("cpu"))
    out = resample_spacing(t, image)
    assert len(out.applied_operations) == 1 and not out.pending_operations
    back = t.inverse(out.clone())
    assert tuple(back.shape[1:]) == (30, 26, 18)
    assert torch.allclose(back.affine, image.affine, atol=1e-9)


def test_identity_spacing_keeps_the_data():
    t = Spacing(pixdim=[0.7, 0.75, 1.25])
    image = to_device(_ct((20, 18, 12)), _affine("axis"), torch.device("cpu"))
    out = resample_spacing(t, image)
    assert torch.equal(out.as_tensor(), image.as_tensor())


def test_volume_goes_over_as_its_stored_dtype(monkeypatch):
    seen = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    image = to_device(np.zeros((1, 4, 4, 4), dtype=np.int16), np.eye(4), torch.device("cpu"))
    assert seen[0] == torch.int16 and image.dtype == torch.float32


def _record_uploads(monkeypatch) -> list[tuple[torch.dtype, torch.dtype, bool]]:
    """Wrap ``on_device.upload`` (the way in's one transfer): (dtype in, dtype out, contiguous out) per call."""
    from volseg.preprocessing import on_device

    calls = []
    real = on_device.upload

    def spy(host, device):
        out = real(host, device)
        calls.append((host.dtype, out.dtype, out.is_contiguous()))
        return out

    monkeypatch.setattr(on_device, "upload", spy)
    return calls


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.int8, np.float16])
def test_transfer_keeps_the_stored_dtype(monkeypatch, dtype):
    """The volume crosses as stored (a reader's transposed view too) and is float32 after, with the
    values converting on the host gave."""
    calls = _record_uploads(monkeypatch)
    stored = (np.arange(5 * 6 * 7) % 120).astype(dtype).reshape(7, 6, 5).transpose(2, 1, 0)[None]  # as ITK's
    image = to_device(stored, np.eye(4), torch.device("cpu"))
    assert calls == [(torch.from_numpy(np.zeros(1, dtype)).dtype,) * 2 + (False,)]  # no host copy on the CPU
    assert image.dtype == torch.float32 and image.is_contiguous()
    assert torch.equal(image.as_tensor(), torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32)))


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint32])
def test_wide_dtypes_cross_as_float32(monkeypatch, dtype):
    calls = _record_uploads(monkeypatch)
    stored = np.arange(4 * 3 * 2, dtype=dtype).reshape(1, 4, 3, 2)
    image = to_device(stored, np.eye(4), torch.device("cpu"))
    assert calls == [(torch.float32, torch.float32, True)]
    assert torch.equal(image.as_tensor(), torch.from_numpy(stored.astype(np.float32)))


@pytest.mark.parametrize("card_id", ["uxnet-amos", "mednext-nnunet-kits19-template"])
def test_stored_dtype_preprocesses_as_float32_did(card_id):
    """An int16 volume through the fast way in gives exactly what its float32 copy gave (and the
    exact path too): the cast is exact, only where it happens moved."""
    card, steps = _steps(card_id)
    stored = np.round(_ct((30, 26, 18))).astype(np.int16)
    for device in (torch.device("cpu"), None):
        got = preprocess(stored, _affine("flipped"), steps, device=device)
        want = preprocess(stored.astype(np.float32), _affine("flipped"), steps, device=device)
        assert torch.equal(got.image.as_tensor(), want.image.as_tensor())
        assert torch.equal(got.image.affine, want.image.affine)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_transfer_is_one_pinned_copy_of_the_stored_dtype(monkeypatch):
    from volseg.preprocessing import on_device

    pinned = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if kwargs.get("pin_memory"):
            pinned.append((out.dtype, out.is_pinned()))
        return out

    calls = _record_uploads(monkeypatch)
    monkeypatch.setattr(on_device.torch, "empty", empty)
    stored = np.round(_ct((24, 20, 16))).astype(np.int16).transpose(0, 3, 2, 1).copy().transpose(0, 3, 2, 1)
    image = to_device(stored, np.eye(4), torch.device("cuda"))
    torch.cuda.synchronize()
    assert calls == [(torch.int16, torch.int16, True)] and pinned == [(torch.int16, True)]
    assert image.is_cuda and image.dtype == torch.float32
    assert torch.equal(image.cpu().as_tensor(), to_device(stored, np.eye(4), torch.device("cpu")).as_tensor())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("card_id", ["uxnet-amos", "mednext-nnunet-kits19-template", "segformer3d-brats"])
def test_cuda_way_in_matches_monai(card_id):
    card, steps = _steps(card_id)
    array = np.repeat(_ct((48, 44, 26)), len(card.inputs), axis=0)
    exact = preprocess(array, _affine("oblique"), steps)
    fast = preprocess(array, _affine("oblique"), steps, device=torch.device("cuda"))
    assert fast.image.is_cuda and fast.image.shape == exact.image.shape
    scale = float(exact.image.abs().max())
    assert float((fast.image.cpu() - exact.image).abs().max()) <= _tolerance(steps) * scale


def test_read_only_and_big_endian_volumes(recwarn):
    a = _ct((12, 10, 8))
    ro = a.copy()
    ro.flags.writeable = False
    big = a.astype(">f4")
    for arr in (ro, big):
        image = to_device(arr, _affine("axis"), torch.device("cpu"))
        assert torch.equal(image.as_tensor(), torch.from_numpy(a))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_spacing_without_fast_path_is_monais_own():
    t = build_transforms([{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "nearest"}}])[0]
    from volseg.preprocessing.on_device import run_step

    image = to_device(_ct((20, 18, 12)), _affine("axis"), torch.device("cpu"))
    got = run_step(t, image)
    want = build_transforms([{"name": "Spacing", "args": {"pixdim": [1.5, 1.5, 2.0], "mode": "nearest"}}])[0](
        to_device(_ct((20, 18, 12)), _affine("axis"), torch.device("cpu")))
    assert torch.equal(got.as_tensor(), want.as_tensor())
