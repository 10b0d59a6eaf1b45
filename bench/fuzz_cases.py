"""Seeded generator of hostile and broken inputs for the engine (used by ``fuzz_run.py``).

Every case is a pure function of ``(seed, index)``: :func:`make_case` writes the case's files
into a folder and returns the ``volseg segment`` arguments that feed them to the engine, so a
failure is reproduced with ``python bench/fuzz_run.py --seed S --only INDEX``.

Families (chosen by the case's random stream):

- ``nifti``: a tiny valid NIfTI-1 with header fields mutated (dims, datatype, bitpix,
  vox_offset, pixdim, qform/sform codes and parameters, scaling, magic), bytes flipped,
  truncated, gzip-wrapped (and the gzip stream truncated).
- ``nrrd``: a NRRD header written field by field with mutated values (type, dimension, sizes,
  encoding, endian, space directions, spacings, origin, detached data file, byte/line skip)
  over correct, short, long or corrupt (compressed) data.
- ``mha``: a MetaImage header with mutated DimSize, ElementType, spacing, TransformMatrix,
  channels, compression, header size and data file.
- ``dicom``: a 2-5 slice series with missing, garbled, short and long ImagePositionPatient /
  ImageOrientationPatient / PixelSpacing, mixed slice sizes and pixel formats, truncated pixel
  data, duplicate positions, stray files.
- ``checkpoint``: a tiny U-Net state_dict as torch zip, legacy pickle, safetensors and a
  TorchScript file, damaged (bytes flipped, truncated, central directory cut, members replaced by
  pickle bombs, deep nesting, huge declared sizes), or replaced by special files.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

FAMILIES = ("nifti", "nrrd", "mha", "dicom", "checkpoint")
#: The tiny network the checkpoint family targets (MONAI UNet, about 4,000 parameters).
UNET_CONFIG = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
               "num_res_units": 1}

_HUGE = [0, -1, 1, 2, 3, 7, 8, 255, 256, 1023, 1024, 2048, 32767, -32768, 65535, 2**31 - 1]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 3.0, 1e-7]


# -- small helpers ---------------------------------------------------------------------------------
def _volume(rng: random.Random, dtype=np.int16) -> np.ndarray:
    shape = tuple(rng.randint(2, 10) for _ in range(3))
    a = np.full(shape, -1000, dtype=np.float64)
    a[tuple(slice(0, max(1, s // 2)) for s in shape)] = 800
    return a.astype(dtype)


def _flip_bytes(rng: random.Random, data: bytes, n: int | None = None, start: int = 0) -> bytes:
    b = bytearray(data)
    if len(b) <= start:
        return bytes(b)
    for _ in range(n or rng.randint(1, 8)):
        i = rng.randrange(start, len(b))
        b[i] = rng.randrange(256)
    return bytes(b)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(0, max(1, len(data)))]


def _maybe_damage(rng: random.Random, data: bytes, p: float = 0.3, start: int = 0) -> bytes:
    r = rng.random()
    if r < p / 2:
        return _flip_bytes(rng, data, start=start)
    if r < p:
        return _truncate(rng, data)
    return data


# -- NIfTI -----------------------------------------------------------------------------------------
def _nifti_bytes(a: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(a, np.diag([1.5, 1.5, 3.0, 1.0]))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    return img.to_bytes()


#: (offset, struct format) of the NIfTI-1 header fields mutated.
_NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"),
    "magic": (344, "4s"),
}


def _mutate_nifti_field(rng: random.Random, b: bytearray) -> None:
    name = rng.choice(list(_NIFTI_FIELDS))
    offset, fmt = _NIFTI_FIELDS[name]
    values = list(struct.unpack_from(fmt, b, offset))
    if name == "magic":
        values = [rng.choice([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"XXXX"])]
    elif fmt.endswith("f"):
        i = rng.randrange(len(values))
        values[i] = rng.choice(_FLOATS + [rng.uniform(-1e6, 1e6)])
    else:
        i = rng.randrange(len(values))
        values[i] = rng.choice(_HUGE + [rng.randint(-40000, 40000)])
        if name in ("dim",):
            values[i] = max(-32768, min(32767, values[i]))
        if name in ("datatype", "bitpix", "qform_code", "sform_code"):
            values[i] = max(-32768, min(32767, rng.choice([values[i], 999, -1, 2, 4, 8, 16, 64, 128, 256, 512, 768,
                                                           1024, 1280, 1792, 2304])))
    struct.pack_into(fmt, b, offset, *values)


def make_nifti(rng: random.Random, folder: Path) -> list[Path]:
    a = _volume(rng, rng.choice([np.int16, np.uint8, np.float32, np.float64, np.int32]))
    b = bytearray(_nifti_bytes(a))
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        _mutate_nifti_field(rng, b)
    data = _maybe_damage(rng, bytes(b), p=0.3)
    if rng.random() < 0.5:
        data = gzip.compress(data, compresslevel=1)
        if rng.random() < 0.15:
            data = _maybe_damage(rng, data, p=1.0)
        path = folder / "in.nii.gz"
    else:
        path = folder / "in.nii"
    path.write_bytes(data)
    return [path]


# -- NRRD ------------------------------------------------------------------------------------------
_NRRD_TYPES = {"short": np.int16, "unsigned char": np.uint8, "float": np.float32, "double": np.float64,
               "int": np.int32, "uint16": np.uint16, "int64": np.int64}


def make_nrrd(rng: random.Random, folder: Path) -> list[Path]:
    type_name = rng.choice(list(_NRRD_TYPES))
    a = _volume(rng, _NRRD_TYPES[type_name])
    sizes = list(a.shape)
    fields = {
        "type": type_name, "dimension": "3", "space": "left-posterior-superior",
        "sizes": " ".join(map(str, sizes)),
        "space directions": "(1.5,0,0) (0,1.5,0) (0,0,3)",
        "kinds": "domain domain domain", "endian": "little",
        "encoding": rng.choice(["raw", "gzip", "bzip2", "ascii"]), "space origin": "(0,0,0)",
    }
    mutations = rng.choice([0, 1, 1, 2, 3])
    for _ in range(mutations):
        key = rng.choice(["type", "dimension", "sizes", "encoding", "endian", "space directions", "spacings",
                          "space origin", "data file", "byte skip", "line skip", "kinds", "space", "drop"])
        if key == "type":
            fields["type"] = rng.choice(list(_NRRD_TYPES) + ["block", "complex", "", "float32x"])
        elif key == "dimension":
            fields["dimension"] = rng.choice(["0", "1", "2", "4", "17", "-3", "x", "3"])
        elif key == "sizes":
            s = list(sizes)
            s[rng.randrange(3)] = rng.choice(_HUGE + [10**9, 10**12, 2**63])
            if rng.random() < 0.2:
                s = s[: rng.randint(0, 4)] + ([5] if rng.random() < 0.5 else [])
            fields["sizes"] = " ".join(map(str, s)) if rng.random() > 0.05 else "a b c"
        elif key == "encoding":
            fields["encoding"] = rng.choice(["raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "hex", "zrl", "?"])
        elif key == "endian":
            fields["endian"] = rng.choice(["big", "little", "middle", ""])
        elif key == "space directions":
            fields["space directions"] = rng.choice([
                "(0,0,0) (0,1,0) (0,0,1)", "(1,1,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)",
                "(1,0,0) (0,1,0)", "(1,0,0) (0,1,0) (0,0,1) (1,1,1)", "none (0,1,0) (0,0,1)", "(1e308,0,0) (0,1,0) (0,0,1)",
                "(-1,0,0) (0,-1,0) (0,0,1)", "garbage"])
        elif key == "spacings":
            fields.pop("space directions", None)
            fields.pop("space", None)
            fields["spacings"] = " ".join(str(rng.choice(_FLOATS)) for _ in range(3))
        elif key == "space origin":
            fields["space origin"] = rng.choice(["(nan,0,0)", "(inf,0,0)", "(1,2)", "(1e308,1e308,1e308)", "x"])
        elif key == "data file":
            fields["data file"] = rng.choice(["missing.raw", "/dev/zero", "in.nrrd", "LIST", "img%03d.raw 0 2 1",
                                              "../../../../etc/hostname", "data.raw"])
        elif key == "byte skip":
            fields["byte skip"] = str(rng.choice([-1, 0, 1, 10**6, 2**40]))
        elif key == "line skip":
            fields["line skip"] = str(rng.choice([-1, 1, 10**6]))
        elif key == "kinds":
            fields["kinds"] = rng.choice(["list domain domain", "RGB-color domain domain domain", "x"])
        elif key == "space":
            fields["space"] = rng.choice(["right-anterior-superior", "scanner-xyz", "3D-right-handed", "nowhere"])
        elif key == "drop":
            fields.pop(rng.choice(list(fields)), None)
    raw = a.astype(a.dtype.newbyteorder("<")).tobytes(order="F")
    encoding = fields.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        payload = gzip.compress(raw, compresslevel=1)
    elif encoding in ("bzip2", "bz2"):
        payload = bz2.compress(raw)
    elif encoding in ("ascii", "text"):
        payload = " ".join(str(v) for v in a.ravel(order="F")).encode() + b"\n"
    elif encoding == "hex":
        payload = raw.hex().encode()
    else:
        payload = raw
    payload = _maybe_damage(rng, payload, p=0.3)
    header = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"
    path = folder / "in.nrrd"
    detached = fields.get("data file")
    if detached == "data.raw":
        (folder / "data.raw").write_bytes(payload)
        path.write_bytes(header.encode())
    elif detached == "LIST":
        path.write_bytes((header.rstrip("\n") + "\nd1.raw\nd2.raw\n").encode())
        (folder / "d1.raw").write_bytes(payload[: len(payload) // 2])
    else:
        path.write_bytes(header.encode() + payload)
    return [path]


# -- MHA -------------------------------------------------------------------------------------------
_MET_TYPES = {"MET_SHORT": np.int16, "MET_UCHAR": np.uint8, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
              "MET_INT": np.int32}


def make_mha(rng: random.Random, folder: Path) -> list[Path]:
    type_name = rng.choice(list(_MET_TYPES))
    a = _volume(rng, _MET_TYPES[type_name])
    fields = {"ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
              "CompressedData": rng.choice(["False", "True"]), "TransformMatrix": "1 0 0 0 1 0 0 0 1",
              "Offset": "0 0 0", "ElementSpacing": "1.5 1.5 3", "DimSize": " ".join(map(str, a.shape)),
              "ElementType": type_name}
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        key = rng.choice(["NDims", "DimSize", "ElementType", "ElementSpacing", "TransformMatrix", "Offset",
                          "ElementNumberOfChannels", "CompressedData", "CompressedDataSize", "HeaderSize",
                          "ElementDataFile", "BinaryDataByteOrderMSB", "drop"])
        if key == "NDims":
            fields[key] = rng.choice(["0", "1", "2", "4", "9", "-1", "x"])
        elif key == "DimSize":
            d = list(a.shape)
            d[rng.randrange(3)] = rng.choice(_HUGE + [10**9, 2**40])
            fields[key] = " ".join(map(str, d))
        elif key == "ElementType":
            fields[key] = rng.choice(list(_MET_TYPES) + ["MET_LONG_LONG", "MET_UCHAR_ARRAY", "MET_OTHER", "MET_STRING"])
        elif key == "ElementSpacing":
            fields[key] = " ".join(str(rng.choice(_FLOATS)) for _ in range(3))
        elif key == "TransformMatrix":
            fields[key] = rng.choice(["0 0 0 0 0 0 0 0 0", "1 1 0 0 1 0 0 0 1", "nan 0 0 0 1 0 0 0 1", "1 0 0 0 1 0"])
        elif key == "Offset":
            fields[key] = rng.choice(["nan 0 0", "inf 0 0", "1e308 0 0", "1 2"])
        elif key == "ElementNumberOfChannels":
            fields[key] = str(rng.choice([0, 2, 3, 1000, -1]))
        elif key == "CompressedData":
            fields[key] = "True"
        elif key == "CompressedDataSize":
            fields[key] = str(rng.choice([0, 1, 10**12, -5]))
        elif key == "HeaderSize":
            fields[key] = str(rng.choice([-1, 0, 10**6, 2**40]))
        elif key == "ElementDataFile":
            fields[key] = rng.choice(["missing.raw", "/dev/zero", "LIST", "d%03d.raw 1 3 1", "data.raw"])
        elif key == "BinaryDataByteOrderMSB":
            fields[key] = "True"
        else:
            fields.pop(rng.choice(list(fields)), None)
    raw = a.tobytes(order="F")
    payload = zlib.compress(raw) if fields.get("CompressedData") == "True" else raw
    payload = _maybe_damage(rng, payload, p=0.3)
    data_file = fields.pop("ElementDataFile", "LOCAL")
    header = "".join(f"{k} = {v}\n" for k, v in fields.items()) + f"ElementDataFile = {data_file}\n"
    path = folder / "in.mha"
    if data_file == "data.raw":
        (folder / "data.raw").write_bytes(payload)
        path.write_bytes(header.encode())
    else:
        path.write_bytes(header.encode() + payload)
    return [path]


# -- DICOM -----------------------------------------------------------------------------------------
def _dicom_slice(k: int, rows: int, cols: int, series_uid: str, study_uid: str, frame_uid: str, uid):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Fuzz^Case", "FUZZ"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
    ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.5, 1.5]
    ds.SliceThickness = 3.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    pixels = np.full((rows, cols), -1000, np.int16)
    pixels[: rows // 2, : cols // 2] = 800
    ds.PixelData = pixels.tobytes()
    return ds


def _garble_dicom(rng: random.Random, ds) -> None:
    """One damage to one slice: a tag missing, short, long, garbled or out of range."""
    what = rng.choice(["ipp_missing", "ipp_short", "ipp_long", "ipp_garbled", "ipp_nan", "iop_missing", "iop_short",
                       "iop_zero", "iop_skew", "iop_garbled", "ps_missing", "ps_zero", "ps_negative", "rows",
                       "bits", "pixels_short", "pixels_long", "series", "photometric", "samples"])
    tag = {"ipp": 0x00200032, "iop": 0x00200037}.get(what[:3])
    if tag is not None and tag in ds:
        del ds[tag]  # a fresh element, whatever VR an earlier damage gave it
        if what.endswith("_missing"):
            return
    if what == "ipp_short":
        ds.ImagePositionPatient = [0.0, 1.0]
    elif what == "ipp_long":
        ds.ImagePositionPatient = [0.0, 1.0, 2.0, 3.0]
    elif what == "ipp_garbled":
        ds.add_new(0x00200032, "LO", rng.choice(["abc", "1\\x\\3", "", "1e400\\0\\0"]))
    elif what == "ipp_nan":
        ds.add_new(0x00200032, "LO", "nan\\0\\0")
    elif what == "iop_short":
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0]
    elif what == "iop_zero":
        ds.ImageOrientationPatient = [0.0] * 6
    elif what == "iop_skew":
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.7, 0.7, 0.0]
    elif what == "iop_garbled":
        ds.add_new(0x00200037, "LO", rng.choice(["x", "1\\0\\0\\0\\1\\y"]))
    elif what == "ps_missing":
        del ds.PixelSpacing
    elif what == "ps_zero":
        ds.PixelSpacing = [0.0, 0.0]
    elif what == "ps_negative":
        ds.PixelSpacing = [-1.5, 1.5]
    elif what == "rows":
        ds.Rows = rng.choice([0, 1, min(ds.Rows + 3, 65535), 65535])
    elif what == "bits":
        ds.BitsAllocated = rng.choice([1, 8, 12, 32, 0])
    elif what == "pixels_short":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    elif what == "pixels_long":
        ds.PixelData = ds.PixelData + b"\x00" * 64
    elif what == "series":
        from pydicom.uid import generate_uid

        ds.SeriesInstanceUID = generate_uid()
    elif what == "photometric":
        ds.PhotometricInterpretation = rng.choice(["RGB", "PALETTE COLOR", "YBR_FULL"])
    elif what == "samples":
        ds.SamplesPerPixel = 3


def make_dicom(rng: random.Random, folder: Path) -> list[Path]:
    from pydicom import config

    saved = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # write the damaged values as asked
    try:
        return _make_dicom(rng, folder)
    finally:
        config.settings.writing_validation_mode = saved


def _make_dicom(rng: random.Random, folder: Path) -> list[Path]:
    from pydicom.uid import generate_uid

    series = folder / "series"
    series.mkdir()
    n = rng.randint(2, 5)
    rows, cols = rng.randint(4, 10), rng.randint(4, 10)
    study, sid, frame = generate_uid(), generate_uid(), generate_uid()
    slices = [_dicom_slice(k, rows, cols, sid, study, frame, generate_uid) for k in range(n)]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        targets = slices if rng.random() < 0.4 else [rng.choice(slices)]
        state = rng.getstate()
        for ds in targets:
            rng.setstate(state)  # the same damage on every targeted slice
            try:
                _garble_dicom(rng, ds)
            except (AttributeError, TypeError, ValueError, KeyError):
                pass  # that damage does not apply to this slice any more (a tag already removed)
    if rng.random() < 0.1:
        target = slices[rng.randrange(n)]
        if "ImagePositionPatient" in slices[0]:
            target[0x00200032] = slices[0][0x00200032]  # a duplicate position
    for k, ds in enumerate(slices):
        path = series / f"IM{k:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        if rng.random() < 0.05:
            path.write_bytes(_maybe_damage(rng, path.read_bytes(), p=1.0, start=132))
    if rng.random() < 0.1:
        (series / "notes.txt").write_text("not a DICOM file")
    if rng.random() < 0.05:
        (series / "empty.dcm").write_bytes(b"")
    return [series]


# -- checkpoints -----------------------------------------------------------------------------------
def _bomb_pickle(depth: int) -> bytes:
    """A dict whose key is a tuple nested ``depth`` deep, each level holding the one below twice."""
    b = bytearray(b"\x80\x02}q\x00)q\x01")
    for i in range(1, depth + 1):
        b += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86" + b"q" + bytes([i + 1])
    return bytes(b + b"K\x01s.")


def _deep_pickle(depth: int) -> bytes:
    """A list nested ``depth`` deep (plain nesting, no sharing)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _zip_replace(data: bytes, member_suffix: str, content: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            z.writestr(info, content if info.filename.endswith(member_suffix) else src.read(info))
    return out.getvalue()


def _loops_while_loading_class():
    import torch

    class LoopsWhileLoading(torch.nn.Module):
        """TorchScript whose ``__setstate__`` (run by torch.jit.load) never returns."""

        def __init__(self) -> None:
            super().__init__()
            self.x = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        @torch.jit.export
        def __getstate__(self) -> tuple[int, bool]:
            return (self.x, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[int, bool]) -> None:
            i = 0
            while i >= 0:
                i = i + 1 if i < 10 else 5
            self.x = state[0]
            self.training = state[1]

    return LoopsWhileLoading


def _LoopsWhileLoading():  # noqa: N802 - builds the module
    return _loops_while_loading_class()()


class CheckpointBases:
    """Valid checkpoints of the tiny U-Net in every container, built once per process."""

    def __init__(self) -> None:
        import torch
        from monai.networks.nets import UNet
        from safetensors.torch import save as save_safetensors

        torch.manual_seed(0)
        net = UNet(**{**UNET_CONFIG, "channels": tuple(UNET_CONFIG["channels"]), "strides": tuple(UNET_CONFIG["strides"])})
        sd = {k: v.contiguous() for k, v in net.state_dict().items()}
        buf = io.BytesIO()
        torch.save(sd, buf)
        self.zip = buf.getvalue()
        buf = io.BytesIO()
        torch.save({"state_dict": sd, "epoch": 3}, buf, _use_new_zipfile_serialization=False)
        self.legacy = buf.getvalue()
        self.safetensors = save_safetensors(sd)

        class Threshold(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                d = (x[:, :1] - 0.5) * 20.0
                return torch.cat([-d, d], dim=1)

        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(Threshold()), buf)
        self.torchscript = buf.getvalue()
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(_LoopsWhileLoading()), buf)
        self.torchscript_loops = buf.getvalue()  # __setstate__ never returns: must be refused unloaded


def make_checkpoint(rng: random.Random, folder: Path, bases: CheckpointBases) -> tuple[Path, bool]:
    """A damaged checkpoint in ``folder``; returns its path and whether it is TorchScript."""
    kind = rng.choice(["zip", "zip", "legacy", "safetensors", "torchscript"])
    data = {"zip": bases.zip, "legacy": bases.legacy, "safetensors": bases.safetensors,
            "torchscript": bases.torchscript}[kind]
    suffix = {"safetensors": ".safetensors"}.get(kind, ".pt")
    path = folder / f"model{suffix}"
    attack = rng.choice(["none", "flip", "flip", "truncate", "cut_directory", "bomb", "deep", "huge_member",
                         "bad_pkl", "device", "fifo", "empty", "folder", "extra_tail", "safetensors_header",
                         "loops_at_load"])
    if attack == "loops_at_load":
        path = folder / "model.pt"
        path.write_bytes(_maybe_damage(rng, bases.torchscript_loops, p=0.2))
        return path, True
    if attack == "device":
        path.symlink_to("/dev/zero")
        return path, kind == "torchscript"
    if attack == "fifo":
        os.mkfifo(path)
        return path, kind == "torchscript"
    if attack == "folder":
        path.mkdir()
        (path / "pytorch_model.bin").write_bytes(_flip_bytes(rng, bases.zip))
        return path, False
    if attack == "empty":
        data = b""
    elif attack == "flip":
        data = _flip_bytes(rng, data, n=rng.randint(1, 32))
    elif attack == "truncate":
        data = _truncate(rng, data)
    elif attack == "cut_directory" and data[:2] == b"PK":
        at = data.rfind(b"PK\x01\x02")
        data = data[:at] + _flip_bytes(rng, data[at:], n=rng.randint(1, 6))
    elif attack == "bomb":
        bomb = _bomb_pickle(rng.choice([30, 40, 60, 100]))
        data = _zip_replace(data, "data.pkl", bomb) if data[:2] == b"PK" else bomb
    elif attack == "deep":
        deep = _deep_pickle(rng.choice([100, 1000, 5000, 100000]))
        data = _zip_replace(data, "data.pkl", deep) if data[:2] == b"PK" else deep
    elif attack == "huge_member" and data[:2] == b"PK":
        at = data.rfind(b"PK\x01\x02")  # first central directory entry: its uncompressed size field
        b = bytearray(data)
        first = data.find(b"PK\x01\x02")
        struct.pack_into("<I", b, first + 24, rng.choice([2**31, 2**32 - 1, 10**9]))
        data = bytes(b) if at >= 0 else data
    elif attack == "bad_pkl" and data[:2] == b"PK":
        data = _zip_replace(data, "data.pkl", rng.choice([b"", b"\x80\x02.", b"garbage", b"\x80\x05\x95" + b"\xff" * 8,
                                                          b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85R.",
                                                          json.dumps({"a": 1}).encode()]))
    elif attack == "extra_tail":
        data = data + os.urandom(rng.randint(1, 64)) if rng.random() < 0.5 else data + b"PK\x05\x06" + b"\x00" * 18
    elif attack == "safetensors_header" and kind == "safetensors":
        b = bytearray(data)
        struct.pack_into("<Q", b, 0, rng.choice([0, 1, 2**40, 2**63, len(data) * 2]))
        data = bytes(b)
    path.write_bytes(data)
    return path, kind == "torchscript"


# -- cases -----------------------------------------------------------------------------------------
THRESHOLD_CARD = {
    "id": "fuzz-threshold", "title": "fuzz threshold", "architecture": {"name": "torchscript"},
    "inputs": [{"name": "CT", "modality": "CT"}], "labels": [{"value": 1, "name": "bright", "color": [255, 0, 0]}],
    "output": {"activation": "softmax"},
    "preprocessing": [{"name": "ScaleIntensityRange",
                       "args": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}],
    "inference": {"roi_size": [16, 16, 16], "overlap": 0.0, "sw_batch_size": 4},
}
UNET_CARD = {**THRESHOLD_CARD, "id": "fuzz-unet", "architecture": {"name": "unet", "config": UNET_CONFIG}}


def family_of(seed: int, index: int) -> str:
    return FAMILIES[random.Random(f"{seed}:{index}:family").randrange(len(FAMILIES))]


def make_case(seed: int, index: int, folder: Path, assets: dict) -> dict:
    """Write case ``index`` of ``seed`` into ``folder`` (empty); return its description:
    ``family``, ``args`` (the ``volseg segment`` arguments) and ``output`` (the result path).

    ``assets`` holds what is shared by all cases: ``"threshold_card"``, ``"unet_card"`` (card
    paths), ``"threshold_model"`` (a TorchScript file), ``"clean_volume"`` (a valid NRRD) and
    ``"bases"`` (a :class:`CheckpointBases`).
    """
    family = family_of(seed, index)
    rng = random.Random(f"{seed}:{index}")
    inputs_dir = folder / "in"
    inputs_dir.mkdir()
    out_dir = folder / "out"
    out_dir.mkdir()
    card, checkpoint = assets["threshold_card"], assets["threshold_model"]
    if family == "checkpoint":
        checkpoint, torchscript = make_checkpoint(rng, inputs_dir, assets["bases"])
        card = assets["threshold_card"] if torchscript else assets["unet_card"]
        inputs = [assets["clean_volume"]]
    else:
        inputs = {"nifti": make_nifti, "nrrd": make_nrrd, "mha": make_mha, "dicom": make_dicom}[family](rng, inputs_dir)
    output = out_dir / "seg.nrrd"
    args = ["segment", *map(str, inputs), "--model", str(card), "--checkpoint", str(checkpoint), "-o", str(output),
            "--progress", "json", "--device", "cpu"]
    return {"family": family, "args": args, "output": str(output), "inputs": [str(p) for p in inputs]}
