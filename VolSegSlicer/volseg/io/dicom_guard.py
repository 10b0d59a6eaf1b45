"""A walk over the data elements of DICOM files before GDCM scans them.

GDCM allocates an element's declared value length before it finds out the file is shorter: a
1 KiB slice whose damaged length field says 700 MiB makes the series scan take 700 MiB.
:func:`check_element_lengths` walks each file's elements (headers only, nothing is read into
memory) and refuses a file whose element claims more bytes than are left in it.

Only files in the DICOM file format (the ``DICM`` marker after the 128-byte preamble) are walked;
others are left to GDCM, which does not take them for DICOM. A deflated transfer syntax is not
walked (its data set is compressed as a whole).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from volseg.errors import InputError

#: Value representations with a 2-byte length in explicit VR; every other one, an unknown (damaged)
#: VR included, has 2 reserved bytes and a 4-byte length, as GDCM reads it.
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
              b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
#: Most elements walked in one file (a slice has a few hundred).
MAX_ELEMENTS = 200_000


def _damaged(path: Path, folder: Path, what: str) -> InputError:
    return InputError(f"the DICOM series in {folder} is damaged: {path.name}: {what}",
                      hint="remove the damaged file or export the series again")


def _walk(data: bytes, pos: int, end: int, explicit: bool, little: bool, path: Path, folder: Path) -> int:
    """Walk elements from ``pos`` to ``end``; returns where the walk stopped.

    Sequences and their items are walked into; the items of encapsulated (compressed) pixel
    data hold raw fragments and are skipped; an undefined-length ``UN`` element (a sequence
    encoded in implicit VR) ends the walk, GDCM handles it.
    """
    order = "<" if little else ">"
    fragments = False
    for _ in range(MAX_ELEMENTS):
        if pos + 8 > end:
            return pos
        group, element = struct.unpack_from(order + "HH", data, pos)
        if group == 0xFFFE:  # item and delimiters: always implicit, 4-byte length
            length = struct.unpack_from(order + "I", data, pos + 4)[0]
            pos += 8
            if element == 0xE0DD:
                fragments = False
            elif element == 0xE000 and length != _UNDEFINED:
                if length > end - pos:
                    raise _damaged(path, folder, f"an item claims {length} bytes, {end - pos} are left in the file")
                if fragments:
                    pos += length
            continue
        vr = data[pos + 4:pos + 6] if explicit else b""
        if explicit and vr not in _SHORT_VRS:
            if pos + 12 > end:
                return pos
            length = struct.unpack_from(order + "I", data, pos + 8)[0]
            header = 12
        elif explicit:
            length = struct.unpack_from(order + "H", data, pos + 6)[0]
            header = 8
        else:
            length = struct.unpack_from(order + "I", data, pos + 4)[0]
            header = 8
        pos += header
        if length == _UNDEFINED:
            if vr == b"UN":
                return pos
            if vr != b"SQ" and (group, element) == (0x7FE0, 0x0010):
                fragments = True
            elif explicit and vr != b"SQ":
                return pos  # an undefined length only sequences and pixel data may have
            continue
        if length > end - pos:
            raise _damaged(path, folder, f"element ({group:04X},{element:04X}) claims {length} bytes, "
                                         f"{end - pos} are left in the file")
        if vr != b"SQ":
            pos += length  # a defined-length sequence is walked into
    return pos


def check_element_lengths(path: Path, folder: Path) -> None:
    """Refuse a DICOM file whose data elements claim more bytes than the file holds.

    Raises:
        InputError: naming the file, the element and the lengths.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 132 or f.read(132)[128:] != b"DICM":
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # enhanced files can be large
            _walk_file(data, path, folder)


def _walk_file(data, path: Path, folder: Path) -> None:
    end = len(data)
    # File meta information: explicit VR little endian, group 0002.
    pos, syntax = 132, ""
    while pos + 8 <= end and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        element = struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4:pos + 6]
        if vr not in _SHORT_VRS:
            length, header = (struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= end else 0), 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if length > end - pos - header:
            raise _damaged(path, folder, f"meta element (0002,{element:04X}) claims {length} bytes, "
                                         f"{end - pos - header} are left in the file")
        if element == 0x0010:
            syntax = data[pos + header:pos + header + length].decode("ascii", "replace").strip(" \0")
        pos += header + length
    if syntax == _DEFLATED:
        return
    # Explicit VR when a VR follows the first tag, whatever the transfer syntax says: writers get
    # this wrong and readers (GDCM, pydicom) look at the data, so this walk does too.
    explicit = pos + 6 <= end and data[pos + 4:pos + 6].isalpha() and data[pos + 4:pos + 6].isupper()
    _walk(data, pos, end, explicit=explicit, little=syntax != _EXPLICIT_BE, path=path, folder=folder)
