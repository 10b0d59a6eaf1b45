"""Which image format a file is: by its name, and by its first bytes -- without SimpleITK or torch.

Readers (ITK's, nibabel's, Slicer's) pick a file's reader by its extension, so a NRRD named
``ct.jpg`` fails with "Unable to determine ImageIO reader". :func:`check_input_content` reads the
first bytes of an input and says what is wrong in the user's terms -- the name, not the file
("ct.jpg holds a NRRD volume; rename it to ct.nrrd") -- or that the file is a picture (a colour
photo, a screenshot) and not a volume at all. ``volseg segment`` runs it before importing torch
(:func:`volseg.request.check_request`); :func:`volseg.io.readers.read_volume` runs it too.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from volseg.errors import InputError
from volseg.io.atomic import full_suffix

#: File extensions read as images, and the format name recorded in ``Source.format``.
FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".seg.nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
}

#: The extension to suggest for a volume format, and its name in messages.
SUGGESTED = {"nifti": (".nii.gz", "NIfTI"), "nrrd": (".nrrd", "NRRD"), "mha": (".mha", "MetaImage")}
#: A NIfTI header of a .hdr/.img pair, which ITK reads under its own name.
_NIFTI_PAIR = (".hdr", ".hdr.gz", ".img", ".img.gz")
#: PNG colour types (IHDR byte 9) in words.
_PNG_COLOURS = {0: "greyscale", 2: "RGB colour", 3: "palette colour", 4: "greyscale with transparency",
                6: "RGBA colour"}


def image_format(path: str | os.PathLike) -> str | None:
    """The format name for a file extension ("nifti", "nrrd", "mha"), None if unknown."""
    return FORMATS.get(full_suffix(path).lower())


@dataclass(frozen=True)
class Sniffed:
    """What a file's first bytes say it is.

    Attributes:
        kind: ``"nifti"``, ``"nrrd"``, ``"mha"`` (volumes), ``"dicom"`` (one DICOM file),
            ``"picture"`` (PNG, JPEG, GIF, BMP) or ``"unknown"``.
        what: the same in words, for messages (``"a PNG picture (640x480, RGB colour)"``).
        colour: a picture with colour channels (a photo, a screenshot); None: not told.
    """

    kind: str
    what: str = ""
    colour: bool | None = False


def _head(path: Path, size: int = 1024) -> bytes:
    with open(path, "rb") as f:
        head = f.read(size)
    if head[:2] == b"\x1f\x8b":  # gzip (.nii.gz): the header is inside
        try:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, size)
        except (zlib.error, gzip.BadGzipFile, EOFError):
            return b""
    return head


def _png(head: bytes) -> Sniffed:
    if len(head) >= 26 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        colour = head[25]
        words = _PNG_COLOURS.get(colour, "colour")
        return Sniffed("picture", f"a PNG picture ({width}x{height}, {words})", colour in (2, 3, 6))
    return Sniffed("picture", "a PNG picture", True)


def sniff(path: str | os.PathLike) -> Sniffed:
    """What ``path`` holds, judged from its first bytes (a gzip file from its decompressed start).

    Reads at most 1 KiB; never raises for unreadable content (``kind == "unknown"``).
    """
    try:
        head = _head(Path(path))
    except OSError:
        return Sniffed("unknown")
    if head.startswith(b"NRRD000"):
        return Sniffed("nrrd", "a NRRD volume")
    if len(head) >= 348 and (struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348) \
            and head[344:347] in (b"n+1", b"ni1"):
        return Sniffed("nifti", "a NIfTI volume")
    if len(head) >= 12 and head[4:12] == b"n+2\0\r\n\x1a\n":
        return Sniffed("nifti", "a NIfTI-2 volume")
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return Sniffed("mha", "a MetaImage volume")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Sniffed("dicom", "a single DICOM file")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head)
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("picture", "a JPEG picture", None)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return Sniffed("picture", "a GIF picture", True)
    if head.startswith(b"BM") and len(head) >= 26 and struct.unpack("<I", head[2:6])[0] > 26:
        return Sniffed("picture", "a BMP picture", True)
    return Sniffed("unknown")


def check_input_content(path: str | os.PathLike) -> None:
    """Refuse an input file whose content its name does not announce, or that is a picture.

    A volume under another format's extension (a NRRD named ``ct.jpg`` or ``ct.nii``) is named
    as such, with the extension to rename it to; a PNG/JPEG/GIF/BMP picture is called a picture
    (a colour photo when it has colour), not a multi-component volume; one DICOM file points to
    its folder. Files that say nothing recognisable are left to the readers. Folders pass.

    Raises:
        InputError: with what the file is and what to do.
    """
    path = Path(path)
    if not path.is_file():
        return
    if path.stat().st_size == 0:  # ITK would say only that it found no reader for it
        raise InputError(f"{path} is empty (0 bytes): it holds no volume",
                         hint="copy or export the volume again; an interrupted download or copy leaves such files")
    found = sniff(path)
    by_name = image_format(path)
    if found.kind == "nifti" and path.name.lower().endswith(_NIFTI_PAIR):
        return  # the header of a NIfTI pair (.hdr + .img): ITK reads it under that name
    if found.kind in SUGGESTED and by_name != found.kind:
        suffix = full_suffix(path) or path.suffix
        stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
        ext, name = SUGGESTED[found.kind]
        said = f"its name ends in {suffix!r}" if suffix else "its name has no extension"
        raise InputError(
            f"{path} holds {found.what} but {said}: the extension is the problem, as image readers (ITK, "
            f"Slicer's too) choose how to read a file by its extension",
            hint=f"rename it to {stem}{ext} (or copy it under that name)",
        )
    if found.kind == "picture":
        kind = {True: "a colour photo or screenshot", False: "a 2D picture", None: "a photo or 2D picture"}[found.colour]
        raise InputError(
            f"{path} is {found.what}: {kind}, not a 3D CT or MRI volume",
            hint="segment a volume: NIfTI (.nii.gz), NRRD (.nrrd), MetaImage (.mha) or a DICOM series folder",
        )
    if found.kind == "dicom" and by_name is None:
        raise InputError(f"{path} is a single DICOM file", hint=f"pass the folder holding the series: {path.parent}")
