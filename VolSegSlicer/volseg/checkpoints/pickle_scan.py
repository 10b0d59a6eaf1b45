"""A bound on what a pickle can make the unpickler do, checked before anything is unpickled.

torch's weights-only unpickler runs no code, but the objects it builds can still cost without
bound: memo references let a pickle of a few hundred bytes describe a tuple nested 60 deep
whose every level holds the level below twice - 2**60 elements once expanded - and hashing it
as a dict key never finishes (in C, holding the interpreter lock, deaf to signals).

:func:`scan_pickle` walks the opcodes (``pickletools.genops``, nothing is built) on a model of
the unpickler's stack and memo in which every object is a :class:`_Node` holding its *expanded*
size (elements counted as often as they are referenced) and its nesting depth. A pickle whose
objects exceed :data:`MAX_EXPANDED` elements or :data:`MAX_DEPTH` levels, or that needs more
than :data:`MAX_OPCODES` opcodes or :data:`MAX_SECONDS` to walk, is refused. Real checkpoints
stay far below: a 1,000-tensor state_dict is about 20,000 opcodes and 10 levels deep.
"""

from __future__ import annotations

import io
import pickletools
import time
from typing import BinaryIO

#: Largest expanded size (elements, references counted each time) of any one object.
MAX_EXPANDED = 20_000_000
#: Deepest nesting of containers and reduced objects.
MAX_DEPTH = 200
#: Most objects on the unpickler's stack at once (pickle writes containers in batches of 1,000).
MAX_STACK = 50_000
#: Most opcodes in one pickle.
MAX_OPCODES = 50_000_000
#: Longest walk of one file's pickles, in seconds.
MAX_SECONDS = 4.0

_MARK = object()
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MEMO_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


class PickleBombError(ValueError):
    """A pickle whose objects would cost more than the bounds allow (the message says which)."""


class PickleFormatError(ValueError):
    """A pickle that is truncated or malformed (the unpickler would fail on it, maybe after
    allocating what a damaged length field says)."""


class _BoundedReader:
    """A binary stream whose reads never ask for more than what is left: a damaged length field
    (4 GiB for a 10 KiB file) must not make ``read`` allocate it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        start = stream.tell()
        stream.seek(0, io.SEEK_END)
        self.end = stream.tell()
        stream.seek(start)

    def read(self, n: int = -1) -> bytes:
        left = self.end - self.stream.tell()
        return self.stream.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        return self.stream.readline(1 << 20 if limit is None or limit < 0 else min(limit, 1 << 20))

    def tell(self) -> int:
        return self.stream.tell()


_UNKNOWN = object()
#: Opcodes whose argument is the (int or str) value they push.
_SCALARS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
                      "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"})
#: Bytes per element of torch's typed storages (legacy format); others count 1 byte per element.
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


class _Node:
    """One object on the modelled stack: expanded size, nesting depth and, for small scalars
    and tuples of them (torch's storage references), the value."""

    __slots__ = ("size", "depth", "value")

    def __init__(self, size: int = 1, depth: int = 0, value=_UNKNOWN) -> None:
        self.size, self.depth, self.value = size, depth, value


def _storage_bytes(pid) -> tuple[str, int] | None:
    """(key, bytes) of a torch storage reference ``('storage', type, key, location, numel, ...)``."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int)):
        return None
    kind = pid[1][1].rsplit(".", 1)[-1] if isinstance(pid[1], tuple) and len(pid[1]) == 2 else ""
    per = _ELEMENT_BYTES.get(kind.removesuffix("Storage"), 1)
    return str(pid[2]), max(0, pid[4]) * per


def _pop_to_mark(stack: list) -> list[_Node] | None:
    items = []
    while stack:
        item = stack.pop()
        if item is _MARK:
            return items
        items.append(item)
    return None  # no mark: malformed, the unpickler refuses it too


def _check(node: _Node) -> None:
    if node.size > MAX_EXPANDED:
        raise PickleBombError(f"an object expands to more than {MAX_EXPANDED:,} elements (shared references)")
    if node.depth > MAX_DEPTH:
        raise PickleBombError(f"objects are nested more than {MAX_DEPTH} levels deep")


def _combine(parts: list[_Node]) -> _Node:
    size = 1 + sum(p.size for p in parts)
    depth = 1 + max((p.depth for p in parts), default=0)
    return _Node(min(size, MAX_EXPANDED + 1), depth)


def _malformed(stream, why: str) -> PickleFormatError:
    return PickleFormatError(f"its pickle is truncated or malformed near byte {stream.tell()} ({why})")


def _walk(stream: _BoundedReader, deadline: float, storages: dict[str, int]) -> bool:
    """Walk one pickle; True when it ended with STOP, False when the stream had nothing left.
    The torch storages it references are added to ``storages`` (key -> declared bytes).

    Raises:
        PickleBombError: see :func:`scan_pickle`.
        PickleFormatError: the pickle is cut short or malformed.
    """
    if stream.tell() >= stream.end:
        return False
    stack: list = []
    memo: dict = {}
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(stream)):
            if count > MAX_OPCODES:
                raise PickleBombError(f"it holds more than {MAX_OPCODES:,} pickle opcodes")
            if count % 65536 == 0 and time.monotonic() > deadline:
                raise PickleBombError(f"its structure takes more than {MAX_SECONDS:g} s to examine")
            name = op.name
            if name in _MEMO_PUT or name == "MEMOIZE":
                if stack and stack[-1] is not _MARK:
                    memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
                continue
            if name in _MEMO_GET:
                stack.append(memo.get(arg, _Node()))
                continue
            if name == "DUP":
                if stack:
                    stack.append(stack[-1])
                continue
            if name == "STOP":
                return True
            before = [str(s) for s in op.stack_before]
            if "mark" in before:
                popped = _pop_to_mark(stack)
                if popped is None:
                    raise _malformed(stream, f"{name} without a mark")
                for _ in range(before.index("mark")):
                    if not stack:
                        raise _malformed(stream, f"{name} on an empty stack")
                    popped.append(stack.pop())
            else:
                if len(stack) < len(before):
                    raise _malformed(stream, f"{name} on an empty stack")
                popped = [stack.pop() for _ in before]
            popped = [p for p in popped if p is not _MARK]
            after = [str(s) for s in op.stack_after]
            if not after:
                continue
            if after == ["mark"]:
                stack.append(_MARK)
                continue
            if name in _MUTATORS and popped:
                container, parts = popped[-1], popped[:-1]  # the container lay below its new items
                container.size = min(container.size + sum(p.size for p in parts), MAX_EXPANDED + 1)
                container.depth = max([container.depth] + [p.depth + 1 for p in parts])
                node = container
            else:
                node = _combine(popped) if popped else _Node()
                if name in _SCALARS:
                    node.value = arg
                elif name == "NONE":
                    node.value = None
                elif name == "GLOBAL" and isinstance(arg, str):
                    node.value = ("global", arg.replace(" ", "."))
                elif name == "STACK_GLOBAL" and all(isinstance(p.value, str) for p in popped):
                    node.value = ("global", f"{popped[1].value}.{popped[0].value}")
                elif name in _TUPLES and len(popped) <= 8 and all(p.value is not _UNKNOWN for p in popped):
                    node.value = tuple(p.value for p in reversed(popped))
                elif name == "BINPERSID" and popped:
                    storage = _storage_bytes(popped[0].value)
                    if storage is not None:
                        storages[storage[0]] = max(storages.get(storage[0], 0), storage[1])
            _check(node)
            stack.extend([node] * len(after))
            if len(stack) > MAX_STACK:
                raise PickleBombError(f"more than {MAX_STACK:,} objects wait on the unpickler's stack (deep nesting)")
    except (PickleBombError, PickleFormatError):
        raise
    except (ValueError, IndexError, EOFError, UnicodeDecodeError) as error:
        raise _malformed(stream, " ".join(str(error).split())[:80] or type(error).__name__) from None
    raise _malformed(stream, "it ends before STOP")


def scan_pickle(data: bytes | BinaryIO, max_pickles: int = 1, seconds: float = MAX_SECONDS) -> int:
    """Walk up to ``max_pickles`` consecutive pickles in ``data`` and refuse a pickle bomb.

    Returns:
        the bytes of tensor data the pickles declare through torch storage references (torch's
        legacy format allocates each storage at its declared size before reading it).

    Args:
        data: the pickle bytes, or a binary file positioned at the first pickle.
        max_pickles: how many pickles follow each other (torch's legacy format writes five,
            then raw tensor data, which is not walked).
        seconds: time allowed for the whole walk.

    Raises:
        PickleBombError: an object too large once expanded or nested too deep, too many
            opcodes, or a walk longer than ``seconds``.
        PickleFormatError: a pickle is cut short or malformed.
    """
    stream = _BoundedReader(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    deadline = time.monotonic() + seconds
    storages: dict[str, int] = {}
    for _ in range(max_pickles):
        if not _walk(stream, deadline, storages):
            break
    return sum(storages.values())
