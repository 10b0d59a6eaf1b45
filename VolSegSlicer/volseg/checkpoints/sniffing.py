"""Telling, from its first bytes, whether a file can be a checkpoint at all -- without torch.

``volseg inspect notes.txt`` and ``volseg segment ... --checkpoint notes.txt`` are answered
from here at once, before PyTorch is imported and before a checksum is computed: a file that is
not a checkpoint is reported as such, not as a "checksum mismatch". What the file holds is
read later by :mod:`volseg.checkpoints.reading`.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from volseg.errors import CheckpointError
from volseg.files import open_checked

#: What ``checkpoint_kind`` returns: a folder (``accelerate.save_state``; read later), a
#: ``torch.save`` zip archive (TorchScript too), a legacy ``torch.save`` pickle, safetensors.
KINDS = ("folder", "zip", "pickle", "safetensors")

_NOT_A_CHECKPOINT_HINT = ("pass the weights file itself (.pt, .pth, .bin, .ckpt, .model written by torch.save, "
                          "or .safetensors); `volseg models` says where each card's weights are published")


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _describe_start(head: bytes, size: int) -> str:
    """What the file is, for the message -- never what it says: a card's checkpoint path can
    name any file the user can read (``/etc/passwd``, a key), and messages travel to logs."""
    try:
        decoded = head[:4096].decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not a character cut in two at the end of the block
            return f"it is a binary file of {size:,} bytes in no checkpoint format"
        decoded = head[:exc.start].decode("utf-8")
    if decoded.lstrip().startswith(("{", "[")):
        try:
            json.loads(head.decode("utf-8"))
            return "it is a JSON file (a model card goes with --model, not --checkpoint)"
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
    return f"it is a text file of {size:,} bytes"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What kind of checkpoint file ``path`` is, judged from its first bytes (see :data:`KINDS`).

    Raises:
        CheckpointError: the path does not exist, cannot be read, is empty, or is not a
            checkpoint (neither a torch.save file nor safetensors).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path given with --checkpoint or in the card")
    if path.is_dir():
        return "folder"
    # Opened without blocking and looked at before the first read: a FIFO would hang the read
    # (and cancel with it), a device would never end.
    fd = open_checked(path, "checkpoint", error=CheckpointError)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4096)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty",
                              hint="the download is incomplete; download it again")
    if head.startswith(b"PK") or zipfile.is_zipfile(path):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if _is_safetensors(head, size):
        return "safetensors"
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a safetensors header",
                              hint="the download may be incomplete or an HTML page; download it again")
    raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_describe_start(head, size)}", hint=_NOT_A_CHECKPOINT_HINT)
