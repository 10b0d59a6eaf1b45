"""What the server refuses, and why: sizes, voxel counts read from a volume's header, jobs, time.

:func:`header_voxels` reads the voxel count from the first bytes of an upload (NRRD, NIfTI,
gzipped NIfTI, MHA), so an upload claiming 10^9 voxels is refused before its body is stored.
Headers that point at other files (NRRD ``data file``, MHA ``ElementDataFile`` other than LOCAL)
are refused: an upload is one self-contained file and never names a path on the server.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

#: Input formats an upload may have (the suffix the client declares for each input).
VOLUME_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
#: Result formats a client may ask for.
RESULT_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
#: The most bytes a header may take before its end is found.
HEADER_LIMIT = 64 * 1024


class Refusal(Exception):
    """A request the server refuses: one JSON error with this HTTP status, message and hint."""

    def __init__(self, status: int, message: str, hint: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.extra = status, message, hint, extra

    def body(self) -> dict:
        return {"error": {"status": self.status, "message": self.message, "hint": self.hint, **self.extra}}


@dataclass
class ServerLimits:
    """The server's limits (``volseg server --help`` names the options).

    Attributes:
        max_upload_bytes: the largest upload (one input volume), default 2 GB.
        max_voxels: the most voxels an input may have (all axes and channels), read from its header.
        jobs_per_token: jobs a token may have at once (waiting for inputs, queued or running).
        job_time_s: a running job is stopped after this many seconds.
        queue_length: jobs that may wait for a device; one more is refused with 503.
        keep_s: a finished job's files are removed this long after it ended if nobody fetched them.
    """

    max_upload_bytes: int = 2 * 1024**3
    max_voxels: int = 512 * 512 * 2048
    jobs_per_token: int = 4
    job_time_s: float = 1800.0
    queue_length: int = 32
    keep_s: float = 3600.0


def _too_many(voxels: int, limits: ServerLimits) -> None:
    if voxels > limits.max_voxels:
        raise Refusal(413, f"the volume has {voxels:,} voxels, more than this server accepts ({limits.max_voxels:,})",
                      hint="crop or resample the volume, or ask the server's administrator for a higher --max-voxels")


def _nrrd_voxels(head: bytes, complete: bool) -> int | None:
    end = head.find(b"\n\n")
    if end < 0:
        end = head.find(b"\r\n\r\n")
    if end < 0:
        if complete or len(head) >= HEADER_LIMIT:
            raise Refusal(400, "the NRRD header has no end (no blank line in its first 64 KB)")
        return None
    text = head[:end].decode("latin-1")
    sizes = None
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        key = key.strip().lower()
        if key in ("data file", "datafile"):
            raise Refusal(400, "the NRRD header points at another data file; upload one self-contained .nrrd",
                          hint="save the volume as a single .nrrd (not .nhdr + .raw)")
        if key == "sizes":
            try:
                sizes = [int(v) for v in value.split()]
            except ValueError:
                raise Refusal(400, f"the NRRD header's sizes ({value.strip()[:60]}) are not whole numbers") from None
    if not sizes or min(sizes) < 1:
        raise Refusal(400, "the NRRD header has no valid 'sizes' field")
    return _product(sizes)


def _mha_voxels(head: bytes, complete: bool) -> int | None:
    text = head[:HEADER_LIMIT].decode("latin-1")
    m = re.search(r"^ElementDataFile\s*=\s*(.*?)\s*$", text, re.M)
    if not m:
        if complete or len(head) >= HEADER_LIMIT:
            raise Refusal(400, "the MHA header has no ElementDataFile line in its first 64 KB")
        return None
    if m.group(1).upper() != "LOCAL":
        raise Refusal(400, "the MHA header points at another data file; upload one self-contained .mha")
    dims = re.search(r"^DimSize\s*=\s*(.*?)\s*$", text[: m.start()], re.M)
    try:
        sizes = [int(v) for v in dims.group(1).split()] if dims else []
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise Refusal(400, "the MHA header has no valid DimSize")
    channels = re.search(r"^ElementNumberOfChannels\s*=\s*(\d+)", text[: m.start()], re.M)
    return _product(sizes) * (int(channels.group(1)) if channels else 1)


def _nifti_voxels(head: bytes) -> int:
    if len(head) < 348:
        raise Refusal(400, "the file is too short to be NIfTI")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            break
        if size == 540:
            if len(head) < 540:
                raise Refusal(400, "the file is too short to be NIfTI-2")
            dims = struct.unpack(endian + "8q", head[16:80])
            break
    else:
        raise Refusal(400, "the file is not a NIfTI volume (its header size is neither 348 nor 540)")
    rank = dims[0]
    if not 1 <= rank <= 7 or min(dims[1: rank + 1]) < 1:
        raise Refusal(400, f"the NIfTI header's dimensions {list(dims)} are not valid")
    return _product(dims[1: rank + 1])


def _product(sizes) -> int:
    n = 1
    for s in sizes:
        n *= int(s)
    return n


def _gunzip_head(head: bytes, want: int) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, want)
    except zlib.error:
        raise Refusal(400, "the .nii.gz upload is not valid gzip data") from None


def header_voxels(head: bytes, suffix: str, complete: bool, limits: ServerLimits) -> int | None:
    """The voxel count in the header at the start of an upload, or None if ``head`` (the first
    bytes; ``complete`` when it is the whole body) is too short to tell yet.

    Raises:
        Refusal: 400 when the bytes are not a volume of that format (or name another file),
            413 when the volume has more voxels than ``limits.max_voxels``.
    """
    if suffix == ".nrrd":
        if len(head) >= 4 and not head.startswith(b"NRRD"):
            raise Refusal(400, "the upload declared as .nrrd is not a NRRD file", hint="upload the volume file itself")
        voxels = _nrrd_voxels(head, complete) if len(head) >= 4 else None
    elif suffix == ".mha":
        voxels = _mha_voxels(head, complete)
    elif suffix in (".nii", ".nii.gz"):
        data = _gunzip_head(head, 540) if suffix == ".nii.gz" else head[:540]
        need = 348 if len(data) >= 4 and 348 in struct.unpack("<i", data[:4]) + struct.unpack(">i", data[:4]) else 540
        if len(data) < need and not complete and len(head) < HEADER_LIMIT:
            return None
        voxels = _nifti_voxels(data)
    else:
        raise Refusal(400, f"input format {suffix!r} is not accepted", hint="use one of " + ", ".join(VOLUME_SUFFIXES))
    if voxels is None:
        if complete:
            raise Refusal(400, f"the upload is too short to be a {suffix} volume")
        return None
    _too_many(voxels, limits)
    return voxels
