"""Jobs on the server: private folders, the bounded queue, and the warm workers that run them.

A job is made by ``POST /v1/jobs`` (model id, input formats, options), gets its inputs uploaded
into its own folder (mode 0700, named by the server: a client never names a path), then waits in
one first-in first-out queue. Each device has one :class:`DeviceWorker`: a thread that keeps one
``volseg serve`` process (the warm worker the Slicer module uses locally, the same engine) and
gives it one job at a time. The worker's JSON events become the job's events, with the job's
folder taken out of every text. A job ends ``done``, ``error`` or ``cancelled``; its folder is
removed when the client deletes the job (after fetching the results) or ``keep_s`` after it ended.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volseg.server.limits import Refusal, ServerLimits

FINAL = ("done", "error", "cancelled")
#: Seconds a worker gets to answer a cancel (or a job-time stop) before it is killed and restarted.
CANCEL_GRACE_S = 10.0
#: Option names a client may set, with their types (the engine checks the values).
OPTION_FLAGS: dict[str, tuple[type, str]] = {
    "roi_size": (list, "--roi-size"), "overlap": (float, "--overlap"), "sw_batch_size": (int, "--sw-batch-size"),
    "flips": (bool, "--flips"), "amp": (bool, "--amp"), "keep_largest": (bool, "--keep-largest"),
    "fill_holes": (bool, "--fill-holes"), "min_island_mm3": (float, "--min-island-mm3"),
}


def option_args(options: Any) -> list[str]:
    """``volseg segment`` arguments for the options a client sent; anything else is a 400."""
    if options is None:
        return []
    if not isinstance(options, dict):
        raise Refusal(400, "'options' must be a JSON object")
    args: list[str] = []
    for name, value in options.items():
        if name not in OPTION_FLAGS:
            raise Refusal(400, f"unknown option {name!r}", hint="options: " + ", ".join(OPTION_FLAGS))
        kind, flag = OPTION_FLAGS[name]
        if value is None:
            continue
        if kind is bool:
            if not isinstance(value, bool):
                raise Refusal(400, f"option {name!r} must be true or false")
            args.append(flag if value else "--no-" + flag[2:])
        elif kind is list:
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value)):
                raise Refusal(400, f"option {name!r} must be three whole numbers between 1 and 4096")
            args += [flag, *[str(v) for v in value]]
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise Refusal(400, f"option {name!r} must be a {'whole ' if kind is int else ''}number")
            args += [flag, repr(value)]
    return args


@dataclass
class Job:
    """One client's run: owner (token name), private folder, inputs, events and state."""

    id: str
    owner: str
    folder: Path
    model: str
    input_suffixes: list[str]
    result_suffix: str
    options: list[str]
    inputs: list[Path | None] = field(default_factory=list)
    state: str = "uploading"
    events: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    ended: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    cancel_requested: bool = False
    timed_out: bool = False
    worker: "DeviceWorker | None" = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def result_path(self) -> Path:
        return self.folder / ("result" + self.result_suffix)

    def add_event(self, event: dict) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def finish(self, state: str, event: dict | None = None) -> None:
        with self.changed:
            if self.state in FINAL:
                return
            if event is not None:
                self.events.append(event)
            self.state, self.ended = state, time.time()
            self.changed.notify_all()

    def public(self, position: int | None = None) -> dict:
        """What the client sees of the job (no server paths)."""
        return {"id": self.id, "state": self.state, "model": self.model, "events": len(self.events),
                "queue_position": position, "created": self.created, "queued": self.queued_at,
                "started": self.started_at, "ended": self.ended}

    def result_files(self) -> list[str]:
        """Names of the result files (the segmentation and, for a label map, its colour table)."""
        if self.state != "done":
            return []
        names = [p.name for p in sorted(self.folder.iterdir()) if p.name.startswith("result") and p.is_file()
                 and not p.is_symlink()]
        return names


def scrub(value: Any, folder: Path) -> Any:
    """``value`` (an event) with the job folder taken out of every string: clients see file names only."""
    prefix = str(folder) + os.sep
    if isinstance(value, str):
        return value.replace(prefix, "").replace(str(folder), ".")
    if isinstance(value, list):
        return [scrub(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v, folder) for k, v in value.items()}
    return value


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGKILL when the server dies, so a killed server leaves no engine running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class DeviceWorker(threading.Thread):
    """One device: a warm ``volseg serve`` process fed one job at a time from the board's queue."""

    def __init__(self, board: "JobBoard", device: str) -> None:
        super().__init__(daemon=True, name=f"volseg-worker-{device}")
        self.board, self.device = board, device
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.current: Job | None = None
        self.busy_seconds = 0.0

    # -- the engine process ------------------------------------------------------------------
    def _start_engine(self) -> None:
        env = dict(os.environ)
        engine_root = str(Path(__file__).resolve().parents[2])  # the folder holding volseg/
        env["PYTHONPATH"] = os.pathsep.join([engine_root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        env["PYTHONUNBUFFERED"] = "1"
        log_name = "worker-" + "".join(c if c.isalnum() else "-" for c in self.device) + ".log"
        log_fd = os.open(self.board.state_dir / log_name,  # the engine's stderr, for the administrator
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "volseg", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log_fd, text=True, encoding="utf-8", errors="replace", bufsize=1, env=env,
                cwd=str(self.board.jobs_dir), preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            os.close(log_fd)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _kill_engine(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._kill_engine()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        self._start_engine()  # warm before the first job: it loads PyTorch while the server waits
        while True:
            job = self.board.next_job()
            if job is None:
                return
            started = time.monotonic()
            try:
                self._run(job)
            except Exception as exc:  # a bug must not stop the device's loop
                job.finish("error", {"event": "error", "message": f"the server failed to run the job ({type(exc).__name__})",
                                     "hint": "try again; tell the server's administrator if it persists", "exit_code": 1})
            finally:
                self.busy_seconds += time.monotonic() - started
                self.current = None
                self.board.job_ended(job)

    def _run(self, job: Job) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._start_engine()
        args = [str(p) for p in job.inputs] + ["--model", job.model, "-o", str(job.result_path),
                                              "--device", self.device, *job.options]
        for folder in self.board.cards_dirs:
            args += ["--cards-dir", str(folder)]
        self.current = job
        job.worker = self
        job.add_event({"event": "log", "level": "info", "message": f"running on {self.board.host_name} ({self.device})"})
        self.proc.stdin.write(json.dumps({"id": job.id, "args": args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.board.limits.job_time_s
        kill_at: float | None = None
        cancel_sent = False
        while True:
            if job.cancel_requested and not cancel_sent:
                self._send_cancel(job)
                cancel_sent, kill_at = True, time.monotonic() + CANCEL_GRACE_S
            if not cancel_sent and time.monotonic() > deadline:
                job.add_event({"event": "log", "level": "warning",
                               "message": f"the job ran longer than this server allows ({self.board.limits.job_time_s:g} s)"})
                job.timed_out = True
                self._send_cancel(job)
                cancel_sent, kill_at = True, time.monotonic() + CANCEL_GRACE_S
            if kill_at is not None and time.monotonic() > kill_at:
                self._kill_engine()
                self._end(job, None)
                return
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:  # the engine died
                self.proc = None
                self._end(job, {"event": "error", "message": "the engine stopped unexpectedly while running the job",
                                "hint": "try again; if it happens again, the server's worker-*.log may say why",
                                "exit_code": 1})
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("request") != job.id:
                continue
            event.pop("request", None)
            event = scrub(event, job.folder)
            if event.get("event") in ("done", "error"):
                self._end(job, event)
                return
            job.add_event(event)

    def _send_cancel(self, job: Job) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cancel": job.id}) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def _end(self, job: Job, event: dict | None) -> None:
        if job.timed_out:
            event = {"event": "error", "message": f"the job was stopped: it ran longer than this server allows "
                     f"({self.board.limits.job_time_s:g} s)", "hint": "use a smaller volume or ask the administrator",
                     "exit_code": 3}
            job.finish("error", event)
        elif job.cancel_requested:
            job.finish("cancelled", {"event": "error", "message": "cancelled; nothing was written", "hint": None,
                                     "exit_code": 130})
        elif event is not None and event.get("event") == "done":
            event["outputs"] = {"segmentation": job.result_path.name, "probabilities": None}
            event["server"] = {"host": self.board.host_name, "device": self.device}
            job.finish("done", event)
        else:
            job.finish("error", event)
        if job.state != "done":
            self.board.remove_files(job)


class JobBoard:
    """Every job the server holds, the queue, the devices' workers and the clean-up of old jobs."""

    def __init__(self, state_dir: Path, limits: ServerLimits, devices: list[str], cards_dirs: list[Path],
                 host_name: str) -> None:
        self.limits, self.cards_dirs, self.host_name = limits, list(cards_dirs), host_name
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        if self.jobs_dir.exists():  # jobs of an earlier run of the server are lost: their files go
            shutil.rmtree(self.jobs_dir, ignore_errors=True)
        self.jobs_dir.mkdir(parents=True, mode=0o700)
        os.chmod(self.jobs_dir, 0o700)
        self.jobs: dict[str, Job] = {}
        self.waiting: list[Job] = []
        self.lock = threading.Condition()
        self.closed = False
        self.workers = [DeviceWorker(self, d) for d in devices]
        self.served = 0

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        threading.Thread(target=self._reap, daemon=True, name="volseg-reaper").start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        for worker in self.workers:
            worker.stop()

    # -- jobs -----------------------------------------------------------------------------
    def create(self, owner: str, model: str, input_suffixes: list[str], result_suffix: str, options: list[str]) -> Job:
        with self.lock:
            active = sum(1 for j in self.jobs.values() if j.owner == owner and j.state not in FINAL)
            if active >= self.limits.jobs_per_token:
                raise Refusal(429, f"this token has {active} unfinished job(s), the most this server allows",
                              hint="wait for a job to end, or cancel one")
            job_id = secrets.token_urlsafe(16)
            folder = self.jobs_dir / job_id
            folder.mkdir(mode=0o700)
            job = Job(job_id, owner, folder, model, input_suffixes, result_suffix, options,
                      inputs=[None] * len(input_suffixes))
            self.jobs[job_id] = job
            return job

    def get(self, job_id: str, owner: str) -> Job:
        """The job, if ``owner``'s token made it; any other job is unknown to that token (404)."""
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None or job.owner != owner:
            raise Refusal(404, "no such job for this token (it may have ended and been removed, or the server restarted)",
                          hint="submit the run again")
        return job

    def enqueue(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) >= self.limits.queue_length:
                raise Refusal(503, f"the server's queue is full ({len(self.waiting)} jobs waiting)",
                              hint="try again later", queue_length=len(self.waiting))
            job.state, job.queued_at = "queued", time.time()
            self.waiting.append(job)
            self.lock.notify_all()
        job.add_event({"event": "log", "level": "info", "message": f"queued ({self.position(job)} ahead)"})

    def position(self, job: Job) -> int | None:
        with self.lock:
            return self.waiting.index(job) if job in self.waiting else None

    def next_job(self) -> Job | None:
        with self.lock:
            while not self.closed:
                while self.waiting:
                    job = self.waiting.pop(0)
                    if job.state == "queued":
                        job.state, job.started_at = "running", time.time()
                        return job
                self.lock.wait()
            return None

    def job_ended(self, job: Job) -> None:
        with self.lock:
            self.served += 1

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued or uploading one ends at once, a running one within seconds."""
        with self.lock:
            if job.state in ("uploading", "queued"):
                if job in self.waiting:
                    self.waiting.remove(job)
                job.cancel_requested = True
                job.finish("cancelled", {"event": "error", "message": "cancelled; nothing was written", "hint": None,
                                         "exit_code": 130})
                self.remove_files(job)
                return
            job.cancel_requested = True

    def delete(self, job: Job) -> None:
        """Forget a job and remove its files (cancelling it first if it still runs)."""
        self.cancel(job)
        with self.lock:
            self.jobs.pop(job.id, None)
        if job.state in FINAL:
            self.remove_files(job)
        # a running job's files go when its worker ends it (its state is then final, and it is forgotten)

    def remove_files(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)

    def _reap(self) -> None:
        while not self.closed:
            time.sleep(min(5.0, max(0.2, self.limits.keep_s / 4)))
            now = time.time()
            with self.lock:
                old = [j for j in self.jobs.values()
                       if (j.state in FINAL and j.ended and now - j.ended > self.limits.keep_s)
                       or (j.state == "uploading" and now - j.created > self.limits.keep_s)]
                for job in old:
                    self.jobs.pop(job.id, None)
            for job in old:
                if job.state == "uploading":
                    self.cancel(job)
                self.remove_files(job)

    def status(self) -> dict:
        with self.lock:
            running = sum(1 for w in self.workers if w.current is not None)
            return {"queued": len(self.waiting), "running": running, "devices": [w.device for w in self.workers],
                    "served": self.served}
