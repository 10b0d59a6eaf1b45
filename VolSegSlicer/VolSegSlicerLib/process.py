"""Running the ``volseg`` engine as a background process (pure Python, no Slicer, no Qt).

:class:`EngineProcess` starts the process in its own process group with stdout and stderr on
separate pipes. Two reader threads put every line on a :class:`queue.Queue`; the GUI drains it
with :meth:`EngineProcess.poll` from a ``qt.QTimer``, so the GUI thread never blocks on a pipe.

Why not ``slicer.util.launchConsoleProcess``: it merges stderr into stdout (the JSON progress
protocol needs them apart) and does not start a new process group, which makes killing the
whole tree (the PythonSlicer launcher, the Python it starts, any DataLoader workers) harder.
The environment still comes from Slicer's startup environment, as launchConsoleProcess does.

Cancelling is graceful first (SIGTERM / CTRL_BREAK: the engine stops cleanly, writes nothing and
exits with 130), then :func:`kill_process_tree` after a grace period.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from VolSegSlicerLib.protocol import EngineEvent, parse_line

try:  # psutil is a requirement of the engine; the module still works without it.
    import psutil
except ImportError:  # pragma: no cover - exercised only where psutil is missing
    psutil = None

_EOF = object()


def kill_process_tree(pid: int, timeout: float = 5.0, wait_for_root: bool = True) -> None:
    """Kill process ``pid`` and all of its descendants, and wait for them to go.

    Uses psutil when available (collects the descendants before killing, so orphans that a
    dying parent leaves behind are still found); otherwise kills the process group on POSIX
    (processes started by :class:`EngineProcess` lead their own group) or runs
    ``taskkill /T /F`` on Windows. ``wait_for_root=False`` leaves reaping the root to its
    ``subprocess.Popen`` (psutil reaping it would hide its exit status from Popen).
    """
    if psutil is not None:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        try:
            procs = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            procs = [root]
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs if wait_for_root else procs[:-1], timeout=timeout)
        return
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:  # only where psutil is missing
        if os.getpgid(pid) == pid:  # it leads its own group (EngineProcess starts it so): kill the group
            os.killpg(pid, signal.SIGKILL)
        else:  # never kill a group that may hold the caller
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class EngineProcess:
    """A background engine process whose output lines are read without blocking.

    Args:
        argv: the full command line, e.g. ``[python, "-m", "volseg", "segment", ...]``.
        env: the environment (None: inherit).
        cwd: the working folder.
        stdin_pipe: keep stdin open for writing requests (``volseg serve``).
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 stdin_pipe: bool = False) -> None:
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self.stdin_pipe = stdin_pipe
        self.proc: subprocess.Popen | None = None
        self.cancel_requested = False
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._threads: list[threading.Thread] = []
        self._kill_deadline: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EngineProcess":
        """Start the process and its reader threads; returns self."""
        kwargs: dict = {}
        if os.name == "nt":  # pragma: no cover - Windows only
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                      name=f"volseg-{name}-reader")
            self._open_streams += 1
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, _EOF))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """True once the process has exited and both pipes are drained."""
        return self.proc is not None and self._open_streams == 0 and self.proc.poll() is not None

    # ------------------------------------------------------------------ I/O
    def poll(self) -> list[EngineEvent]:
        """Return the events read since the last call (never blocks). Call it from a timer."""
        events: list[EngineEvent] = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is _EOF:
                self._open_streams -= 1
                continue
            events.append(parse_line(line, name))
        if self._kill_deadline is not None and time.monotonic() > self._kill_deadline and self.is_running():
            self.kill()
        return events

    def send_line(self, text: str) -> None:
        """Write one line to the process's stdin (``volseg serve`` requests)."""
        if not self.proc or not self.proc.stdin:
            raise RuntimeError("this process was started without a stdin pipe")
        self.proc.stdin.write(text.rstrip("\n") + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[EngineEvent]:
        """Block until the process ends (for scripts and self-tests); returns all its events."""
        events: list[EngineEvent] = []
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            events += self.poll()
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"the engine did not finish within {timeout} s")
            time.sleep(interval)
        return events + self.poll()

    # ------------------------------------------------------------------ stopping
    def cancel(self, grace_s: float = 5.0) -> None:
        """Ask the engine to stop cleanly; the whole tree is killed if it is still alive after
        ``grace_s`` seconds (checked by :meth:`poll`)."""
        self.cancel_requested = True
        if not self.is_running():
            return
        try:
            if os.name == "nt":  # pragma: no cover - Windows only
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        self._kill_deadline = time.monotonic() + grace_s

    def kill(self) -> None:
        """Kill the process and all its descendants now."""
        self.cancel_requested = True
        self._kill_deadline = None
        if self.proc is None or self.proc.poll() is not None:
            return
        kill_process_tree(self.proc.pid, wait_for_root=False)
        if os.name != "nt":
            # Anything left in its group (e.g. orphans psutil could not see). The root is not reaped
            # yet, so its pid (= the group id) cannot have been reused by another process.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def close(self) -> None:
        """Stop the process if it still runs (used when the module is closed or reloaded)."""
        if self.is_running():
            if self.stdin_pipe and self.proc.stdin:
                try:
                    self.proc.stdin.close()  # ``volseg serve`` exits on EOF
                    self.proc.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.is_running():
                self.kill()


def python_executable() -> str:
    """The Python to run the engine with: ``PythonSlicer`` inside Slicer, else this Python.

    Inside Slicer ``sys.executable`` may be the Slicer application itself, so the
    ``PythonSlicer`` launcher (on PATH in Slicer, or beside the executable) comes first.
    """
    import shutil

    found = shutil.which("PythonSlicer")
    if found:
        return found
    exe_dir = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(exe_dir, name)
        if os.path.isfile(candidate):
            return candidate
    return sys.executable
