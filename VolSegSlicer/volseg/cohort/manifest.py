"""The batch manifest: what happened to each case of a cohort, and what a re-run may skip.

``volseg batch`` keeps ``OUT_DIR/volseg-manifest.jsonl``, one JSON object per line. While a
run goes on, a row is appended (and flushed to disk) as each case ends, so a run that is killed
outright loses at most the line being written (a broken last line is ignored when read). When
the run ends -- finished, failed or cancelled -- the file is rewritten atomically with exactly
one row per case (the latest), cases of earlier runs into the same folder included.

A row::

    {"case": "p001", "status": "done" | "failed" | "not_done" | "skipped",
     "inputs": ["/data/p001.nii.gz"], "outputs": [{"name": "p001.seg.nrrd", "size": 81234,
     "mtime_ns": ..., "sha256": ...}], "made_with": {"model": ..., "card_sha256": ..., "checkpoint_sha256": ...,
     "options": {...}, "inputs": [...]}, "elapsed_s": 3.2, "timings": {"infer": 2.1, ...},
     "cpu_s": 5.1, "overhead_s": 0.006, "device": "cuda", "where": "ran on cuda", "node": "gpu-3",
     "worker": "pid 1234", "attempts": 1,
     "error": null | {"message": ..., "hint": ..., "exit_code": ...}, "finished_at": "...Z",
     "software": "volseg 0.1.0"}

``outputs`` and ``made_with`` describe the result files volseg wrote for the case and that are
still there, with the settings they were made with (a failed or cancelled re-run keeps the
earlier result and says so). ``elapsed_s`` is the case's time in its worker, ``cpu_s`` the worker process's CPU time
meanwhile, ``overhead_s`` (``--cluster`` runs) the rest of the time from sending the case to a
worker to having its outcome back: scheduling and transfer.

A re-run **skips** a case whose result files are all there,
unchanged since volseg wrote them (size, modification time and SHA-256 of the content: a row
can be forged, a file's size and time copied, its content not), and were made with the same
model card, checkpoint SHA-256, options and input files; a result volseg made with other
settings is redone and replaced; a file volseg did not make (or that changed since) is never
replaced without ``--overwrite``.

The manifest is someone else's file until checked: it is opened without following a symlink
(``volseg-manifest.jsonl -> ~/.bashrc`` is refused, never appended to), only as a regular
file (a FIFO does not hang the batch) owned by the user; each line is parsed with bounds
(length, nesting, digits) and a row of the wrong shape is ignored like a broken line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volseg import __version__
from volseg.errors import OutputError
from volseg.files import open_checked, read_checked
from volseg.io import atomic_output

MANIFEST_NAME = "volseg-manifest.jsonl"
#: The largest manifest read (about a million cases) and the longest row.
MAX_MANIFEST_BYTES = 1 << 30
MAX_ROW_CHARS = 1 << 20

DONE, FAILED, NOT_DONE, SKIPPED = "done", "failed", "not_done", "skipped"


def sha256_of_json(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys), e.g. of a model card."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def input_signature(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """What identifies a case's input files: name, and for files size and modification time.

    A DICOM folder is identified by its name only (listing thousands of slices per case on a
    network file system would make starting a large cohort slow).
    """
    signature = []
    for path in paths:
        entry: dict[str, Any] = {"name": Path(path).name}
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if not Path(path).is_dir():
                entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        signature.append(entry)
    return signature


def file_sha256(path: Path) -> str | None:
    """SHA-256 of the regular file ``path`` (not following a final symlink); None if it cannot be read."""
    try:
        fd = open_checked(path, "result", follow=False)
    except Exception:  # noqa: BLE001 (missing, a link, a FIFO: not a file volseg wrote)
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(out_dir: Path, names: Iterable[str]) -> list[dict[str, Any]] | None:
    """``[{"name", "size", "mtime_ns", "sha256"}]`` of the files ``names`` in ``out_dir``; None
    if one is missing."""
    records = []
    for name in names:
        try:
            st = os.stat(out_dir / name)
        except OSError:
            return None
        records.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "sha256": file_sha256(out_dir / name)})
    return records


@dataclass(frozen=True)
class Plan:
    """What to do with one case: ``action`` is "run" or "skip"; ``overwrite`` lets the run
    replace result files; ``reason`` says why (logged)."""

    action: str
    overwrite: bool = False
    reason: str = ""


@dataclass
class Manifest:
    """The manifest of one output folder, opened for one run (see the module docstring).

    Use as a context manager: entering reads the earlier rows and takes an exclusive lock (a
    second ``volseg batch`` into the same folder is refused while this one runs); leaving
    rewrites the file with one row per case.
    """

    out_dir: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable_lines: int = 0
    _stream: Any = None

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    # -- opening, appending, closing -----------------------------------------------------------
    def __enter__(self) -> Manifest:  # noqa: PYI034 (Self needs Python 3.11)
        self.rows, self.unreadable_lines = read_rows(self.path)
        # Never through a symlink, never into a FIFO or another user's file (see the module docstring).
        fd = open_checked(self.path, "the manifest", append=True, follow=False, owned=True, error=OutputError)
        self._stream = os.fdopen(fd, "a", encoding="utf-8")
        _lock_or_refuse(self._stream, self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.compact()
        finally:
            self._stream.close()

    def record(self, row: dict[str, Any]) -> None:
        """Store ``row`` as its case's latest and append it to the file at once (flushed, fsync'd)."""
        row = {"case": row["case"], **row, "finished_at": _now(), "software": f"volseg {__version__}"}
        self.rows.pop(row["case"], None)  # re-inserted last: the compacted file follows the order of events
        self.rows[row["case"]] = row
        self._stream.write(json.dumps(row, default=str) + "\n")
        self._stream.flush()
        with contextlib.suppress(OSError):
            os.fsync(self._stream.fileno())

    def compact(self) -> None:
        """Rewrite the file atomically with one row (the latest) per case."""
        with atomic_output(self.path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in self.rows.values())

    # -- what a run does with each case ------------------------------------------------------
    def plan(self, case: str, outputs: list[str], made_with: dict[str, Any], overwrite: bool) -> Plan:
        """Decide whether ``case`` runs, given its result file names and the settings of this run."""
        present = [name for name in outputs if (self.out_dir / name).exists()]
        if not present:
            return Plan("run", overwrite)
        ours = self.owned(case, outputs)
        if overwrite:
            return Plan("run", True, "--overwrite")
        if ours and len(present) == len(outputs):
            previous = self.rows[case]["made_with"]
            if previous == made_with:
                return Plan("skip", reason="done before with the same model, checkpoint, options and inputs")
            changed = ", ".join(k for k in made_with if previous.get(k) != made_with[k]) or "settings"
            return Plan("run", True, f"its result was made with other {changed}; redoing it")
        if ours:  # some of volseg's own files are missing: redo them
            return Plan("run", True, "some of its result files are missing; redoing it")
        return Plan("skip", reason=f"{present[0]} exists and was not written by volseg batch with these settings "
                    "(or changed since); pass --overwrite to replace it")

    def owned(self, case: str, outputs: list[str]) -> bool:
        """Whether the result files of ``case`` that exist are the ones volseg recorded writing."""
        row = self.rows.get(case) or {}
        recorded = {r["name"]: r for r in row.get("outputs") or [] if isinstance(r, dict) and "name" in r}
        if not recorded or not isinstance(row.get("made_with"), dict):
            return False
        for name in outputs:
            path = self.out_dir / name
            if not path.exists():
                continue
            st = path.stat()
            r = recorded.get(name)
            if r is None or r.get("size") != st.st_size or r.get("mtime_ns") != st.st_mtime_ns:
                return False
            if not isinstance(r.get("sha256"), str) or r["sha256"] != file_sha256(path):
                return False  # same size and time, other content (or a row without a hash)
        return True

    def kept_result(self, case: str, outputs: list[str]) -> dict[str, Any]:
        """The ``outputs``/``made_with`` fields of a row whose run wrote nothing: the earlier
        result when it is still there and volseg's, else none."""
        if self.owned(case, outputs):
            current = file_records(self.out_dir, [n for n in outputs if (self.out_dir / n).exists()])
            return {"outputs": current, "made_with": self.rows[case]["made_with"]}
        return {"outputs": [], "made_with": None}


def read_rows(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The latest row per case in the manifest at ``path`` (none if missing) and how many lines
    could not be read (a line cut short by a killed run, a hand edit, a row of the wrong shape).

    Raises:
        OutputError: the manifest is a symlink, not a regular file, another user's, or unreadable.
    """
    rows: dict[str, dict[str, Any]] = {}
    bad = 0
    if not os.path.lexists(path):
        return rows, 0
    data = read_checked(path, "the manifest", MAX_MANIFEST_BYTES, follow=False, owned=True, error=OutputError)
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            bad += 1
            continue
        rows.pop(row["case"], None)
        rows[row["case"]] = row
    return rows, bad


def _parse_row(line: str) -> dict[str, Any] | None:
    """The row on ``line``, or None when it is not one: not JSON, too long, too deep, numbers of
    thousands of digits, or fields of the wrong type (``"outputs": 5``)."""
    if len(line) > MAX_ROW_CHARS:
        return None
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer past Python's digit limit
        return None
    if not isinstance(row, dict) or not isinstance(row.get("case"), str):
        return None
    outputs = row.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(_is_record(r) for r in outputs)):
        return None
    if row.get("made_with") is not None and not isinstance(row["made_with"], dict):
        return None
    return row


def _is_record(record: Any) -> bool:
    """Whether ``record`` is a ``{"name", "size", "mtime_ns", ["sha256"]}`` of :func:`file_records`."""
    return (isinstance(record, dict) and isinstance(record.get("name"), str)
            and all(type(record.get(k)) is int for k in ("size", "mtime_ns"))
            and isinstance(record.get("sha256", ""), (str, type(None))))


def _lock_or_refuse(stream: Any, path: Path) -> None:
    """Hold an exclusive lock on the open manifest; refuse if another run holds it.

    Where the platform or file system has no such locks (Windows, some network mounts), runs
    are not protected from each other.
    """
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.close()
        raise OutputError(f"another volseg batch is writing into {path.parent} now",
                          hint="wait for it to finish, or choose another output folder") from None
    except OSError:
        return


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
