"""Size guards for input files: nothing is allocated for voxels before the header's claim is checked.

A header declares how many voxels of which type follow. A damaged or hostile header can claim
gigabytes in a file of a few kilobytes, and the readers (ITK, nibabel) allocate what the header
says before they find out the data is missing. :func:`check_declared_size` compares the claim
with the bytes that can really be there *before* any reader touches the voxels:

- uncompressed data: the declared bytes must fit in the file that holds them;
- deflate (gzip/zlib) data: at most :data:`DEFLATE_MAX_RATIO` times the compressed bytes,
  the largest expansion deflate can encode;
- bzip2 (NRRD only): the stream is decompressed in small chunks and counted (nothing is kept);
- text encodings: at least one byte per value.

It also refuses anything that is not a regular file (a device such as ``/dev/zero``, a FIFO, a
socket), which a reader would otherwise read for ever. The memory the read needs is compared
with the memory available (:func:`volseg.memory.check_allocation`).
"""

from __future__ import annotations

import bz2
import math
import struct
from pathlib import Path

import SimpleITK as sitk

from volseg.errors import InputError
from volseg.memory import check_allocation, require_regular_file

#: The largest expansion of a deflate stream (RFC 1951: a 258-byte match in about 2 bits).
DEFLATE_MAX_RATIO = 1032
#: Bytes of a header read as text (NRRD, MHA); real headers are a few KiB.
MAX_HEADER_BYTES = 1 << 20

_COMPONENT_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4, sitk.sitkFloat64: 8, sitk.sitkComplexFloat32: 8, sitk.sitkComplexFloat64: 16,
    sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1, sitk.sitkVectorUInt16: 2, sitk.sitkVectorInt16: 2,
    sitk.sitkVectorUInt32: 4, sitk.sitkVectorInt32: 4, sitk.sitkVectorUInt64: 8, sitk.sitkVectorInt64: 8,
    sitk.sitkVectorFloat32: 4, sitk.sitkVectorFloat64: 8,
}


def _text_header(path: Path) -> tuple[list[str], int]:
    """The header lines of a NRRD or MHA file and the byte offset where the header ends."""
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES)
    lines, offset = [], 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        line = raw.decode("latin-1").rstrip("\r")
        if not line.strip() and lines:  # NRRD: a blank line ends the header
            break
        lines.append(line)
        if line.replace(" ", "").lower().startswith("elementdatafile="):  # MHA: the last field
            break
    return lines, min(offset, len(head))


#: Most data files a detached header may name.
MAX_DATA_FILES = 100_000


def _pattern_files(path: Path, spec: str) -> list[Path]:
    """The files of a printf-style data file pattern ``name%03d.raw MIN MAX STEP [...]``."""
    parts = spec.split()
    try:
        first, last, step = (int(v) for v in parts[1:4])
    except ValueError:
        raise InputError(f"{path}: the data file pattern {spec[:80]!r} is not 'name%d.raw min max step'",
                         hint="the header is damaged; export the image again") from None
    if step == 0 or (last - first) // step + 1 > MAX_DATA_FILES or (last - first) * step < 0:
        raise InputError(f"{path}: the data file pattern {spec[:80]!r} names no or too many files",
                         hint="the header is damaged; export the image again")
    try:
        return [path.parent / (parts[0] % i) for i in range(first, last + (1 if step > 0 else -1), step)]
    except (TypeError, ValueError):
        raise InputError(f"{path}: the data file pattern {spec[:80]!r} is not a printf pattern",
                         hint="the header is damaged; export the image again") from None


def _listed_files(path: Path, names: list[str]) -> list[Path]:
    """The data files a ``LIST`` names (one per line after the header); refused when none."""
    names = [n for n in names if n][:MAX_DATA_FILES + 1]
    if not names or len(names) > MAX_DATA_FILES:
        raise InputError(f"{path}: the header's data file LIST names {'no' if not names else 'too many'} files",
                         hint="list the data files after the header, one per line")
    for name in names:
        if len(name) > 255 or not name.isprintable():
            raise InputError(f"{path}: the header's data file LIST holds {name[:40]!r}, which is not a file name",
                             hint="list the data files after the header, one per line")
    return [path.parent / n for n in names]


def _nrrd_data(path: Path) -> tuple[list[Path], str, int]:
    """Data files, encoding and (for attached data) the header length of a NRRD file."""
    lines, header_end = _text_header(path)
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    in_list = False
    for line in lines[1:]:
        if in_list:
            data_lines.append(line.strip())
            continue
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        fields[key] = value.lstrip("=").strip()
        if key in ("data file", "datafile") and fields[key].upper().startswith("LIST"):
            in_list = True
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None:
        return [path], encoding, header_end
    if in_list:
        return _listed_files(path, data_lines), encoding, 0
    if len(data_file.split()) > 1:  # a printf pattern "name%03d.raw min max step [dim]"
        return _pattern_files(path, data_file), encoding, 0
    return [path.parent / data_file], encoding, 0


def _mha_data(path: Path) -> tuple[list[Path], str, int]:
    """Data files, encoding ("raw" or "gzip") and header length of an MHA/MHD file."""
    header_end = _text_header(path)[1]
    fields = _mha_fields(path)
    encoding = "gzip" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    data_file = fields.get("elementdatafile", "LOCAL")
    if "compresseddatasize" in fields:  # MetaIO allocates this many bytes before reading them
        try:
            compressed = int(float(fields["compresseddatasize"]))
        except ValueError:
            compressed = -1
        if not 0 < compressed <= path.stat().st_size * (1 if data_file.upper() == "LOCAL" else 2**20):
            raise InputError(f"{path}: CompressedDataSize = {fields['compresseddatasize']} is not a possible size "
                             "of the data in the file", hint="the header is damaged; export the image again")
    if data_file.upper() == "LOCAL":
        return [path], encoding, header_end
    if data_file.upper().startswith("LIST"):
        with open(path, "rb") as f:
            f.seek(header_end)
            rest = f.read(MAX_HEADER_BYTES).decode("latin-1", errors="replace")
        return _listed_files(path, [line.strip() for line in rest.splitlines()]), encoding, 0
    if len(data_file.split()) > 1:
        return _pattern_files(path, data_file), encoding, 0
    return [path.parent / data_file], encoding, 0


def _mha_fields(path: Path) -> dict[str, str]:
    fields = {}
    for line in _text_header(path)[0]:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _ints(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        return None


def check_header_fields(path: Path, fmt: str | None) -> None:
    """Refuse, before any image library parses the header, what would crash or stall it:

    - a detached data file (NRRD ``data file``, MHA ``ElementDataFile``) that is missing or not
      a regular file (teem reads ``/dev/zero`` line by line for ``line skip``);
    - MetaImage dimension fields that are impossible: ITK's MetaIO crashes (segmentation fault)
      on ``NDims = -1`` and allocates whatever ``DimSize``, ``HeaderSize`` and
      ``CompressedDataSize`` imply.

    Raises:
        InputError: naming the field and the file.
    """
    if fmt in ("nrrd", "mha"):
        files = (_nrrd_data if fmt == "nrrd" else _mha_data)(path)[0]
        for data in files:
            try:
                missing = data != path and not data.exists()
            except OSError as error:  # a name too long for the file system, ...
                raise InputError(f"{path}: its data file {str(data)[:200]!r} cannot be opened "
                                 f"({error.strerror or error})") from None
            if missing:
                raise InputError(f"{path}: its data file {data} does not exist",
                                 hint="keep the header and its data file together")
            require_regular_file(data, "data file")
    if fmt != "mha":
        return
    fields = _mha_fields(path)
    hint = "the header is damaged; export the image again"
    ndims = _ints(fields.get("ndims", ""))
    if not ndims or len(ndims) != 1 or not 1 <= ndims[0] <= 8:
        raise InputError(f"cannot read {path} as an image: NDims = {fields.get('ndims', '(missing)')[:40]} is not "
                         "a number of dimensions", hint=hint)
    dims = _ints(fields.get("dimsize", ""))
    if not dims or len(dims) != ndims[0] or min(dims) < 1:
        raise InputError(f"cannot read {path} as an image: DimSize = {fields.get('dimsize', '(missing)')[:60]} is "
                         f"not {ndims[0]} positive sizes", hint=hint)
    if "headersize" in fields:
        header_size = _ints(fields["headersize"])
        compressed = fields.get("compresseddata", "false").lower() == "true"
        data_size = files[0].stat().st_size if files else path.stat().st_size
        if (not header_size or len(header_size) != 1 or header_size[0] < -1 or header_size[0] > data_size
                or (header_size[0] == -1 and compressed)):
            raise InputError(f"cannot read {path} as an image: HeaderSize = {fields['headersize'][:40]} is not possible"
                             + (" for compressed data" if compressed else ""), hint=hint)
    if "elementnumberofchannels" in fields:
        channels = _ints(fields["elementnumberofchannels"])
        if not channels or len(channels) != 1 or not 1 <= channels[0] <= 4096:
            raise InputError(f"cannot read {path} as an image: ElementNumberOfChannels = "
                             f"{fields['elementnumberofchannels'][:40]} is not a number of channels", hint=hint)


def _nifti_data(path: Path) -> tuple[list[Path], str, int]:
    """The file, its encoding and, uncompressed, where the voxels start (``vox_offset``)."""
    with open(path, "rb") as f:
        head = f.read(540)
    if head[:2] == b"\x1f\x8b":
        return [path], "gzip", 0
    offset = 0
    if len(head) >= 540 and struct.unpack("<i", head[:4])[0] == 540:  # NIfTI-2
        offset = struct.unpack("<q", head[168:176])[0]
    elif len(head) >= 348:
        for endian in "<>":
            if struct.unpack(endian + "i", head[:4])[0] == 348:
                value = struct.unpack(endian + "f", head[108:112])[0]
                offset = int(value) if math.isfinite(value) and 0 <= value < 2**62 else 0
    return [path], "raw", max(offset, 348 if len(head) >= 348 else 0)


def _bzip2_length(path: Path, offset: int, limit: int) -> int:
    """Decompressed length of the bzip2 stream at ``offset``, counted in chunks up to ``limit``+1."""
    decompressor, total = bz2.BZ2Decompressor(), 0
    with open(path, "rb") as f:
        f.seek(offset)
        while total <= limit and not decompressor.eof:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            try:
                total += len(decompressor.decompress(chunk, max_length=1 << 24))
                while not decompressor.needs_input and not decompressor.eof and total <= limit:
                    total += len(decompressor.decompress(b"", max_length=1 << 24))
            except (OSError, EOFError, ValueError):
                break
    return total


def declared_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes of voxel data a header declares (after ``ReadImageInformation``)."""
    voxels = 1
    for n in reader.GetSize():
        voxels *= int(n)
    per_component = _COMPONENT_BYTES.get(reader.GetPixelID(), 8)
    return voxels * per_component * max(1, int(reader.GetNumberOfComponents()))


def check_declared_size(path: Path, fmt: str | None, reader: sitk.ImageFileReader) -> None:
    """Refuse a header that declares more voxel data than its file can hold, or than memory can.

    Args:
        path: the image file (header).
        fmt: ``"nifti"``, ``"nrrd"`` or ``"mha"``; for other formats ITK reads, only the memory
            is checked.
        reader: an ITK reader on ``path`` after ``ReadImageInformation`` (nothing read yet).

    Raises:
        InputError: the data is shorter than declared (truncated file, damaged header), or a
            data file is missing or not a regular file.
        ResourceError: the voxels would not fit in the memory available.
    """
    need = declared_bytes(reader)
    size = "x".join(str(n) for n in reader.GetSize())
    locate = {"nifti": _nifti_data, "nrrd": _nrrd_data, "mha": _mha_data}.get(fmt or "")
    files, encoding, offset = locate(path) if locate else ([], "raw", 0)
    if files:
        have = 0
        for data in files:
            if not data.exists():
                raise InputError(f"{path}: its data file {data} does not exist",
                                 hint="keep the header and its data file together")
            have += require_regular_file(data, "data file").st_size
        have = max(0, have - offset)
        if encoding in ("gzip", "gz"):
            bound, how = have * DEFLATE_MAX_RATIO, "can expand to at most"
        elif encoding in ("bzip2", "bz2"):
            bound = _bzip2_length(files[0], offset, need) if len(files) == 1 else need
            how = "decompresses to"
        elif encoding in ("ascii", "text", "txt"):
            bound, how = have * max(1, need // max(1, _voxels(reader))), "can hold at most"
        elif encoding == "hex":
            bound, how = have // 2, "can hold at most"
        else:
            bound, how = have, "holds"
        if need > bound:
            raise InputError(
                f"{path}: the header declares {size} voxels ({_mib(need)} of data) but the file {how} {_mib(bound)}",
                hint="the file is truncated or its header is damaged; export it again",
            )
    # The read holds the native voxels, a float32 copy and the stacked channels.
    check_allocation(need + 2 * 4 * _voxels(reader), f"reading {path} ({size} voxels)")


def _voxels(reader: sitk.ImageFileReader) -> int:
    n = 1
    for s in reader.GetSize():
        n *= int(s)
    return n


def _mib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n} bytes"
