"""How much memory a run may use, and the refusal when a step would need more.

The memory available is the smaller of what the operating system reports as available
(``psutil``) and what the process's address-space limit (``ulimit -v``, ``RLIMIT_AS``) still
allows, so a run under a memory cap is refused up front instead of dying half-way.
"""

from __future__ import annotations

import os
import stat

from volseg.errors import InputError, ResourceError, VolSegError

#: Share of the available memory one allocation may take.
SAFETY_FRACTION = 0.9


def _rlimit_headroom() -> int | None:
    """Bytes the address-space limit still allows this process, None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        import psutil

        return max(0, soft - psutil.Process().memory_info().vms)
    except (ImportError, OSError, ValueError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate (None when unknown)."""
    candidates = []
    try:
        import psutil

        candidates.append(int(psutil.virtual_memory().available))
    except ImportError:
        pass
    headroom = _rlimit_headroom()
    if headroom is not None:
        candidates.append(headroom)
    return min(candidates) if candidates else None


def format_bytes(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def check_allocation(n_bytes: int, what: str) -> None:
    """Refuse ``what`` up front when it needs more than :data:`SAFETY_FRACTION` of the memory available.

    Raises:
        ResourceError: naming ``what``, the bytes needed and the bytes available.
    """
    free = available_memory()
    if free is not None and n_bytes > SAFETY_FRACTION * free:
        raise ResourceError(
            f"{what} needs about {format_bytes(n_bytes)} of memory but only {format_bytes(free)} are available",
            hint="crop or resample the volume, or close other programs; if the size is unexpected, the header may be damaged",
        )


def require_regular_file(path: str | os.PathLike, what: str = "input",
                         error: type[VolSegError] = InputError) -> os.stat_result:
    """The ``stat`` of ``path`` (symlinks followed) if it is a regular file; else one clear refusal.

    Raises:
        ``error`` (:class:`InputError` by default): a device, FIFO, socket or other special
            file, or a path that cannot be examined.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{what} {path} is {kind}, not a regular file", hint="give the path of a file")
    return st


def available_bytes(free: int, total: int, allocated: int, reserved: int, fraction: float | None = None) -> int:
    """Memory this process can still allocate on a GPU.

    Args:
        free, total: ``torch.cuda.mem_get_info`` (the whole device).
        allocated, reserved: this process's ``torch.cuda.memory_allocated`` / ``memory_reserved``
            (the caching allocator's free blocks, ``reserved - allocated``, are ours to reuse).
        fraction: the cap of ``torch.cuda.set_per_process_memory_fraction``, if any (1.0: none).
    """
    usable = free + max(0, reserved - allocated)
    if fraction is not None and fraction < 1.0:
        usable = min(usable, int(fraction * total) - allocated)
    return max(0, usable)


def gpu_available_bytes(device) -> int:
    """:func:`available_bytes` for a CUDA ``device`` (a ``torch.device``), now: what the window batch,
    the way in and the way back may size their pieces from."""
    import torch  # only here: this module is read before torch is imported

    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names none
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction(index) if get_fraction is not None else None  # refuses a device without an index
    return available_bytes(free, total, torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index),
                           fraction)
