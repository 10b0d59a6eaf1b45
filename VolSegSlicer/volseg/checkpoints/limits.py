"""Bounds a checkpoint must pass before torch reads it: a regular file, a sound zip archive whose
members fit in the file and in memory, and pickles without bombs (:mod:`volseg.checkpoints.pickle_scan`).

Each refusal is a :class:`~volseg.errors.CheckpointError` (or a
:class:`~volseg.errors.ResourceError` for memory) naming the user's file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from volseg.errors import CheckpointError, VolSegError
from volseg.memory import check_allocation, require_regular_file
from volseg.checkpoints.pickle_scan import PickleBombError, PickleFormatError, scan_pickle

#: Largest pickle member walked (torch's data.pkl holds structure only; tensors lie beside it).
MAX_PICKLE_BYTES = 256 * 2**20
#: The largest expansion of a deflate stream.
DEFLATE_MAX_RATIO = 1032
#: torch.save's legacy (non-zip) format: magic, protocol, sys info, object, storage keys.
LEGACY_PICKLES = 5

_REDOWNLOAD = "download the file again and compare its size or checksum with the published one"


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {what}", hint=_REDOWNLOAD)


def _bomb(path: Path, error: PickleBombError) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} was refused: {error}; no real checkpoint is built like this",
                           hint="the file is damaged or made to stall the reader; get it again from a trusted source")


def zip_members(path: Path) -> list[str] | None:
    """The member names of a zip checkpoint after checking the archive; None when it is not a zip.

    Raises:
        CheckpointError: a damaged archive (central directory, member past the end of the file,
            impossible compression ratio) or a pickle bomb in a ``.pkl`` member.
        ResourceError: the members would not fit in memory.
    """
    size = os.path.getsize(path)
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            total = 0
            for info in infos:
                end = info.header_offset + info.compress_size
                if info.header_offset < 0 or end > size:
                    raise _damaged(path, f"the zip member {info.filename} extends past the end of the file "
                                         "(truncated or damaged archive)")
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * DEFLATE_MAX_RATIO:
                    raise _damaged(path, f"the zip member {info.filename} claims an impossible size")
                if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                    raise _damaged(path, f"the zip member {info.filename} has inconsistent sizes")
                total += info.file_size
            check_allocation(total, f"loading checkpoint {path}")
            for info in infos:
                if not info.filename.endswith(".pkl"):
                    continue
                if info.file_size > MAX_PICKLE_BYTES:
                    raise _damaged(path, f"its pickle {info.filename} is {info.file_size / 2**20:.0f} MiB, "
                                         f"more than the {MAX_PICKLE_BYTES // 2**20} MiB a checkpoint's structure needs")
                scan_pickle(archive.read(info), max_pickles=1)
            return [info.filename for info in infos]
    except PickleBombError as error:
        raise _bomb(path, error) from None
    except PickleFormatError as error:
        raise _damaged(path, str(error)) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError,
            OSError, RuntimeError, UnicodeDecodeError) as error:
        # zlib.error is an Exception subclass not listed above; caught by the caller's guard.
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise _damaged(path, f"its zip archive is damaged ({reason})") from None


def _check_torchscript_code(path: Path, names: list[str]) -> None:
    """Refuse a TorchScript archive whose code runs while it loads (``__setstate__``).

    torch.jit.load runs such methods from the file itself, holding the interpreter lock: a
    loop in one hangs the process beyond the reach of signals, and what it does is the file's
    choice. Modules saved by ``torch.jit.script``/``trace`` of ordinary networks have none.
    """
    with zipfile.ZipFile(path) as archive:
        for name in names:
            if "/code/" not in name or not name.endswith(".py"):
                continue
            info = archive.getinfo(name)
            if info.file_size > MAX_PICKLE_BYTES:
                raise _damaged(path, f"its code member {name} is {info.file_size / 2**20:.0f} MiB")
            if b"__setstate__" in archive.read(info):
                raise CheckpointError(
                    f"{path} is TorchScript whose own code runs while it loads (__setstate__ in {name}), "
                    "so it was refused: such code can hang or do what its author chose",
                    hint="if you trust where this file comes from, pass --trust-pickle; better, export the "
                    "weights as a state_dict or .safetensors",
                )


def check_checkpoint_file(path: Path, trust_code: bool = False) -> list[str] | None:
    """Refuse a checkpoint that is not a regular file, a damaged zip, a pickle bomb, or (unless
    ``trust_code``) TorchScript that runs its own code while loading; return the zip member
    names (None for a plain pickle file, which is then walked too)."""
    require_regular_file(path, "checkpoint", CheckpointError)
    try:
        names = zip_members(path)
        if names is not None and not trust_code and any("/code/" in n for n in names):
            _check_torchscript_code(path, names)
    except VolSegError:  # CheckpointError, or ResourceError for memory
        raise
    except Exception as error:  # zlib.error, BadZipFile and the like from a member's data
        reason = " ".join(str(error).split())[:120] or type(error).__name__
        raise _damaged(path, f"its zip archive is damaged ({reason})") from None
    if names is not None:
        return names
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":
                f.seek(0)
                declared = scan_pickle(f, max_pickles=LEGACY_PICKLES)
                size = os.fstat(f.fileno()).st_size
                if declared > size:  # torch allocates each storage at its declared size, then reads it
                    raise _damaged(path, f"it declares {declared:,} bytes of tensor data but the file holds "
                                         f"{size:,} bytes (truncated, or a damaged storage size)")
    except PickleBombError as error:
        raise _bomb(path, error) from None
    except PickleFormatError as error:
        raise _damaged(path, str(error)) from None
    return None
