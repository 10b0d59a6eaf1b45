"""``volseg serve``: the warm worker the Slicer module keeps, one JSON request per stdin line.

Every line that is not a request -- not UTF-8, longer than :data:`MAX_LINE_BYTES`, not JSON,
nested too deeply, an integer of thousands of digits, arguments of the wrong type -- is answered
with one error event and the worker goes on with the next line; at the end of stdin it exits.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

from volseg import signals
from volseg.cli.parser import add_segment_options
from volseg.cli.running import run_reported
from volseg.cli.segment import request_from_args
from volseg.errors import Cancelled, InputError, VolSegError, error_from_exception

#: The longest request line read (a request is a few hundred bytes of paths and options).
MAX_LINE_BYTES = 1 << 20
#: The longest request id (as JSON) echoed back in the answers.
MAX_ID_CHARS = 1000


class _RequestParser(argparse.ArgumentParser):
    """The serve worker's argument parser: never prints and never exits.

    ``error``, ``exit`` and ``print_help``/``print_usage`` raise a :class:`VolSegError` with the
    text instead, so a bad request becomes one error event and stdout holds nothing but JSON.
    """

    def error(self, message: str):  # type: ignore[override]
        raise InputError(f"bad segment arguments: {message}", hint=self.format_usage().strip())

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise InputError(f"bad segment arguments: {(message or '').strip() or f'exit status {status}'}")

    def print_help(self, file=None) -> None:
        raise InputError("the worker does not run --help; the segment arguments are in the hint",
                         hint=self.format_help())

    def print_usage(self, file=None) -> None:
        raise InputError("the worker does not print usage", hint=self.format_usage().strip())


_EOF = object()  # end of stdin; never a message (JSON `null` parses to None, which is a bad request)
_BLANK = object()  # an empty line: no request, no answer


def _id_key(request_id: Any) -> str:
    """A hashable, type-exact key for a JSON request id (1 and "1" differ, lists are allowed)."""
    try:
        return json.dumps(request_id, sort_keys=True)
    except (ValueError, RecursionError, TypeError):
        return "x" * (MAX_ID_CHARS + 1)  # refused as too long by _message


class _ServeQueue:
    """The worker's requests, in order, and the cancels that reach them.

    ``{"cancel": id}`` stops the running request when it has that id and marks a queued request
    with that id so it is skipped (reported as cancelled); ``{"cancel": true}`` or
    ``{"cancel": null}`` stops whatever runs. A cancel for an id that is neither running nor
    queued changes nothing.
    """

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}  # id key -> queued requests with that id
        self._cancelled: set[str] = set()
        self._running: str | None = None

    def put(self, msg: Any) -> None:
        with self._lock:
            if isinstance(msg, dict):
                key = _id_key(msg.get("id"))
                self._pending[key] = self._pending.get(key, 0) + 1
            self.messages.put(msg)

    def cancel(self, target: Any) -> None:
        with self._lock:
            if target is True or target is None:
                if self._running is not None:
                    self.cancel_event.set()
                return
            key = _id_key(target)
            if key == self._running:
                self.cancel_event.set()
            elif key in self._pending:
                self._cancelled.add(key)

    def next(self) -> tuple[Any, bool]:
        """The next message (``_EOF`` at the end) and whether it was cancelled while queued;
        a request that is not cancelled becomes the running one."""
        msg = self.messages.get()
        with self._lock:
            if not isinstance(msg, dict):
                return msg, False
            key = _id_key(msg.get("id"))
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
            if key in self._cancelled:
                if key not in self._pending:
                    self._cancelled.discard(key)
                return msg, True
            self.cancel_event.clear()
            self._running = key
            return msg, False

    def finished(self) -> None:
        with self._lock:
            self._running = None
            self.cancel_event.clear()

    def read(self, stream) -> None:
        """Feed the lines of ``stream`` (run in a thread): cancels act at once, the rest queue;
        a line that is no request queues its error. Always ends with ``_EOF``."""
        try:
            for line in _lines(stream):
                try:
                    msg = _message(line)
                    if msg is _BLANK:
                        continue
                    if isinstance(msg, dict) and "cancel" in msg:
                        self.cancel(msg["cancel"])
                    else:
                        self.put(msg)
                except Exception as exc:  # noqa: BLE001 (never let one line end the reader)
                    self.put(error_from_exception(exc))
        finally:
            self.put(_EOF)


def _too_long() -> InputError:
    return InputError(f"request line longer than {MAX_LINE_BYTES:,} bytes; ignored",
                      hint='send one {"id": ..., "args": [...]} per line')


def _lines(stream) -> Iterator[str | VolSegError]:
    """The lines of ``stream``, each at most :data:`MAX_LINE_BYTES`; an over-long line or one
    that is not UTF-8 yields an error instead. A real stdin is read as bytes (its text layer
    would raise on invalid UTF-8 and end the loop)."""
    raw = getattr(stream, "buffer", None)
    if raw is None or not hasattr(raw, "readline"):
        for line in stream:  # a text stream given by a caller (tests, an embedding program)
            yield line if len(line) <= MAX_LINE_BYTES else _too_long()
        return
    while True:
        line = raw.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            while line and not line.endswith(b"\n"):  # skip the rest of it
                line = raw.readline(MAX_LINE_BYTES)
            yield _too_long()
            continue
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield InputError(f"request line is not UTF-8 (byte {line[exc.start]:#04x} at {exc.start}); ignored",
                             hint="send requests as UTF-8 JSON")


def _message(line: str | VolSegError) -> Any:
    """The JSON message on ``line``, the error to answer it with, or ``_BLANK`` (skipped)."""
    if isinstance(line, VolSegError):
        return line
    if not line.strip():
        return _BLANK
    try:
        msg = json.loads(line)
    except RecursionError:
        return InputError("bad request: JSON nested too deeply; ignored")
    except ValueError:  # not JSON, or an integer past Python's digit limit
        return {"invalid": line.strip()[:200]}
    if isinstance(msg, dict):
        for key in ("id", "cancel"):
            if key in msg and len(_id_key(msg[key])) > MAX_ID_CHARS:
                return InputError(f"bad request: its {key} is longer than {MAX_ID_CHARS} characters as JSON")
    return msg


def _parse_request(parser: argparse.ArgumentParser, msg: Any) -> argparse.Namespace:
    if isinstance(msg, VolSegError):
        raise msg
    if isinstance(msg, dict) and isinstance(msg.get("args"), list) and not all(
            isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in msg["args"]):
        raise InputError("bad request: every argument must be a string or a number",
                         hint='send {"id": ..., "args": ["in.nrrd", "--model", ...]}')
    if not isinstance(msg, dict) or not isinstance(msg.get("args"), list):
        shown = json.dumps(msg) if not isinstance(msg, dict) or "invalid" not in msg else msg["invalid"]
        raise InputError(f"bad request {shown[:200]}", hint='send {"id": ..., "args": ["in.nrrd", "--model", ...]}')
    return parser.parse_args([str(a) for a in msg["args"]])


def cmd_serve(_: argparse.Namespace, stdin=None, stdout=None) -> int:
    """Warm worker: each stdin line is ``{"id": ..., "args": [segment arguments]}`` or
    ``{"cancel": id}`` (``{"cancel": true}``: whatever runs now); answers are the JSON events of
    ``segment --progress json`` tagged with ``"request": id``, and nothing else goes to stdout.
    A request cancelled before it started is answered with one error event, exit code 130.
    The loaded model stays in memory between requests."""
    from volseg.pipeline import ModelCache, segment
    from volseg.progress import JsonReporter

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = _RequestParser(prog="volseg serve", add_help=True)
    add_segment_options(parser)
    cache, requests = ModelCache(), _ServeQueue()
    threading.Thread(target=requests.read, args=(stdin,), daemon=True).start()
    while True:
        msg, cancelled = requests.next()
        if msg is _EOF:
            return 0
        reporter = JsonReporter(stdout, request=msg.get("id") if isinstance(msg, dict) else None)
        try:
            if cancelled:
                raise Cancelled("cancelled before it started; nothing was written")
            args = _parse_request(parser, msg)
        except Exception as exc:  # noqa: BLE001 (a bad request is answered, never the end of the worker)
            err = error_from_exception(exc)
            reporter.error(err.message, err.hint, err.exit_code)
            requests.finished()
            continue
        def run(args: argparse.Namespace = args, reporter: JsonReporter = reporter) -> None:
            segment(request_from_args(args), reporter, requests.cancel_event, cache)

        try:
            run_reported(reporter, run)
        finally:
            requests.finished()
        if signals.cancel_event.is_set():  # SIGINT/SIGTERM stop the worker, not only the request
            return 130
