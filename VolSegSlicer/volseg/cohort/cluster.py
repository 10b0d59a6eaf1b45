"""``volseg batch --cluster``: the cases of a cohort spread over a pool of Ray actors.

Ray (``pip install "volseg[cluster]"``) is imported only here, and this module only when
``--cluster`` is given. Each actor (:class:`CaseWorker`) holds the model warm on its own device
-- one GPU per actor where the cluster has GPUs, else CPU actors with a fixed number of threads
each -- and segments one case at a time with :func:`volseg.cohort.case_runner.run_case`, the function
the plain batch runs. Inputs and results are paths on a file system every node sees; a worker
that cannot see a path fails that case with a clear message.

Faults: when an actor's process dies (killed, out of memory, node lost) the case it was
segmenting is cleaned up (no partial result stays) and tried again on another actor, up to
``--retries`` times, then marked failed; a fresh actor replaces the dead one and the rest of the
cohort goes on (actors that fail to start are replaced only a few times: that is a broken
installation, and the cases left then fail with its message). A cancel (Ctrl-C) asks the running cases to stop between
windows; a second Ctrl-C kills the actors at once.

``--cluster local`` starts a private Ray instance on this machine that listens on the loopback
interface only; ``auto`` joins the cluster this machine belongs to (``ray start``);
``ray://HOST:PORT`` connects to a cluster's Ray Client server.

Trust: a Ray driver sends its token to, and unpickles what comes from, the cluster it joins, so
volseg never discovers a cluster through a path other local users can write. Ray's own
discovery reads ``/tmp/ray/ray_current_cluster`` (``/tmp/ray`` is world-writable, without the
sticky bit) and scans the machine's processes; instead ``auto`` takes the address from
``RAY_ADDRESS`` or from that file only when it is a regular file of the user's own that nobody
else can change (else it refuses, naming the file). ``local`` starts its own instance in a
fresh private folder (mode 0700, under ``$XDG_RUNTIME_DIR`` where there is one) with a token of
its own in a private file (mode 0600), whatever other Ray instances run on the machine, and
removes the folder when it stops.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from volseg import __version__
from volseg.cohort.case_runner import Job, discard_partial_outputs, node_name, run_case
from volseg.errors import Cancelled, InputError, ResourceError
from volseg.files import private_folder, read_checked
from volseg.pipeline import ModelCache, SegmentRequest

#: Seconds to wait for a first worker to start before giving up on the cohort.
START_TIMEOUT_S = 300.0
#: Seconds the running cases get to stop after a cancel before their actors are killed.
CANCEL_GRACE_S = 30.0
#: Most CPU threads given to one CPU actor when --workers is not given.
CPU_THREADS_PER_WORKER = 4

ENGINE_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding this volseg package

Outcome = dict[str, Any]


@dataclass(frozen=True)
class ClusterSettings:
    """Where ``--cluster`` runs a cohort.

    ``address``: "local" (start Ray on this machine), "auto" (the cluster this machine belongs
    to) or "ray://HOST:PORT"; ``workers``: actors in the pool (None: one per GPU, or as many as
    the CPUs allow); ``retries``: how often a case whose worker died is tried again.
    """

    address: str
    workers: int | None = None
    retries: int = 2


def _ray_missing() -> ResourceError:
    return ResourceError("--cluster needs Ray, which is not installed",
                         hint='pip install "volseg[cluster]" (in a checkout: pip install -e ".[cluster]")')


def require_ray() -> None:
    """Refuse at once, with one clear message, when Ray is not installed -- without importing it
    (imported, it could no longer be told to keep a local instance on the loopback interface)."""
    if "ray" in sys.modules:
        if sys.modules["ray"] is None:
            raise _ray_missing()
        return
    if importlib.util.find_spec("ray") is None:
        raise _ray_missing()


def import_ray():
    """Ray, or one clear message saying how to install it."""
    try:
        import ray
    except ImportError:
        raise _ray_missing() from None
    return ray


# -- connecting --------------------------------------------------------------------------------
def check_address(address: str) -> None:
    if address not in ("local", "auto") and not (address.startswith("ray://") and len(address) > len("ray://")):
        raise InputError(f"--cluster {address!r} is not local, auto or ray://HOST:PORT",
                         hint="local starts Ray on this machine; auto joins the cluster this machine belongs to")


def _runtime_env() -> dict[str, Any]:
    """Workers import the same volseg as this process where its folder is visible to them."""
    path = os.pathsep.join(p for p in (ENGINE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


#: Environment variables a local instance sets for itself (and its daemons) while it runs.
_LOCAL_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "VOLSEG_RAY_INSTANCE")
#: The private folder of the local instance this process started, and the environment before it.
_local: dict[str, Any] = {}


def start_local(num_cpus: int | None = None, runtime_env: dict[str, Any] | None = None) -> Path:
    """Start a private Ray instance on this machine: loopback interface only, no dashboard, no
    usage statistics sent; ``num_cpus`` (default: all) CPUs. ``runtime_env`` adds to the
    workers' environment (the volseg of this process is always on their path).

    The instance lives in a fresh folder only this user can enter (Ray's ``_temp_dir``), with a
    token of its own in a private file, and never joins another instance, whatever
    ``RAY_ADDRESS`` or ``/tmp/ray`` say. Returns the folder; :func:`stop_local` stops the
    instance and removes it."""
    # Ray reads these when it is first imported: the instance then advertises 127.0.0.1 and
    # binds its servers there, and reports nothing to Ray's usage-statistics server.
    if "ray" in sys.modules:
        warnings.warn("Ray was imported before volseg started its local instance, which may then listen on "
                      "every network interface", stacklevel=2)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    folder = private_folder("volseg-ray-")
    token = folder / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    _local.update(folder=folder, environ={k: os.environ.get(k) for k in _LOCAL_ENV},
                  watchdog=_start_watchdog(folder))
    atexit.register(shutil.rmtree, folder, True)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # the token comes from the private file only
    os.environ.pop("RAY_ADDRESS", None)
    # Every process of the instance inherits the marker: the watchdog finds them by it.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), VOLSEG_RAY_INSTANCE=str(folder))
    imported_before = "ray" in sys.modules
    ray = import_ray()
    if imported_before:  # Ray read its settings at import: make it read the token mode and file again
        with contextlib.suppress(Exception):
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
    env = _runtime_env()
    extra = dict(runtime_env or {})
    env["env_vars"].update(extra.pop("env_vars", {}))
    # Ray makes its temporary folder world-writable (mode 0777): it is one level down, inside
    # the private folder, which nobody else can enter.
    temp_dir = folder / "ray"
    temp_dir.mkdir(mode=0o700)
    handlers = _signal_handlers()
    try:
        # address="local": start a new instance, never look for one (RAY_ADDRESS, /tmp/ray).
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 runtime_env={**env, **extra}, log_to_driver=False, logging_level="warning",
                 _temp_dir=str(temp_dir))
    except BaseException:
        stop_local()
        raise
    finally:
        _restore_signal_handlers(handlers)
    return folder


def _signal_handlers() -> dict[int, Any]:
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the handlers Ray replaced (its SIGTERM handler exits with status 1 and no word):
    SIGTERM is then a cancel like Ctrl-C -- exit 130, one final event -- and the instance is
    stopped on the way out."""
    import signal

    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


#: The watchdog: while the driver lives, notes every process of its instance (those that carry
#: the instance's marker, and their children: Ray's agents rewrite their environment with their
#: process title, so they are found as the raylet's children); when its stdin closes (the driver
#: stopped the instance, or died, even by SIGKILL) it ends those still running and removes the folder.
_WATCHDOG = """
import os, shutil, sys, threading
folder, driver = sys.argv[1], int(sys.argv[2])
closed = threading.Event()
threading.Thread(target=lambda: (sys.stdin.buffer.read(), closed.set()), daemon=True).start()
try:
    import psutil
except ImportError:
    psutil = None
tracked = {}

def scan():
    try:
        family = psutil.Process(driver).children(recursive=True)
    except psutil.Error:
        return
    for p in family:
        try:
            if p.pid != os.getpid() and p.environ().get("VOLSEG_RAY_INSTANCE") == folder:
                for q in [p, *p.children(recursive=True)]:
                    tracked.setdefault(q.pid, q)
        except (psutil.Error, OSError):
            pass

try:
    while psutil is not None and not closed.wait(1.0):
        scan()
    if psutil is not None:
        procs = [p for p in tracked.values() if p.is_running()]
        for p in procs:
            try:
                procs.extend(c for c in p.children(recursive=True) if c.pid not in tracked)
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
finally:
    shutil.rmtree(folder, ignore_errors=True)
"""


def _start_watchdog(folder: Path):
    """A small process that cleans up after the local instance when this process ends in any
    way (Ray's own agents otherwise outlive a killed driver for minutes)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "VOLSEG_RAY_INSTANCE"}
    try:
        return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(folder), str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    except OSError:
        return None


def stop_local() -> None:
    """Stop the instance :func:`start_local` started (if Ray runs) and remove its private folder."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    folder = _local.pop("folder", None)
    for key, value in _local.pop("environ", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    watchdog = _local.pop("watchdog", None)
    if watchdog is not None:  # it ends what ray.shutdown left and removes the folder
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        with contextlib.suppress(Exception):
            watchdog.wait(timeout=30)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def ray_address_file() -> Path:
    """The file where ``ray start`` records the address of this machine's cluster (Ray's rule:
    ``$RAY_TMPDIR``, else ``$TMPDIR`` on Linux, else ``/tmp``; then ``ray/ray_current_cluster``)."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    if not root:
        import tempfile

        root = "/tmp" if os.name == "posix" else tempfile.gettempdir()
    return Path(root) / "ray" / "ray_current_cluster"


_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-_\[\]:]{1,255}:[0-9]{1,5}$")


def auto_address() -> str:
    """The address ``--cluster auto`` joins: ``$RAY_ADDRESS``, else the one ``ray start`` wrote
    to :func:`ray_address_file` when that is a regular file of this user's that nobody else can
    change. Never a file another local user could have written, never a scan of processes.

    Raises:
        ResourceError: neither gives an address that can be trusted (the file is named).
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env
    path = ray_address_file()
    hint = ("set RAY_ADDRESS=HOST:PORT (the address `ray start --head` prints), or use --cluster local "
            "for this machine alone")
    if not os.path.lexists(path):
        raise ResourceError(f"--cluster auto: RAY_ADDRESS is not set and {path} does not exist: no cluster to join",
                            hint=hint)
    try:
        text = read_checked(path, "Ray's cluster address file", 4096, follow=False, private=True,
                            error=ResourceError).decode("utf-8", "replace").strip()
    except ResourceError as exc:
        raise ResourceError(f"--cluster auto: RAY_ADDRESS is not set and {exc.message}", hint=hint) from None
    if not _HOST_PORT.match(text):
        raise ResourceError(f"--cluster auto: {path} does not hold a HOST:PORT address", hint=hint)
    return text


def _private_token_file() -> None:
    """Make Ray's default token file (``~/.ray/auth_token``, written mode 0644) private to its owner."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        import stat

        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == getattr(os, "geteuid", lambda: st.st_uid)():
            os.chmod(path, 0o600)


def connect(address: str) -> bool:
    """Make this process a Ray driver for ``address``; True when it must disconnect afterwards
    (False: Ray was initialised already, e.g. by a test or a benchmark, and stays so)."""
    check_address(address)
    if "ray" in sys.modules and sys.modules["ray"] is not None and sys.modules["ray"].is_initialized():
        return False
    if address == "local":
        start_local()  # imports Ray (after telling it to keep to the loopback interface)
        return True
    target = auto_address() if address == "auto" else address
    _private_token_file()
    ray = import_ray()
    try:
        ray.init(address=target, runtime_env=_runtime_env(), log_to_driver=False, logging_level="warning")
    except Exception as exc:  # noqa: BLE001 (ConnectionError, a timeout, a refused handshake: one message)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResourceError(f"cannot join the Ray cluster at {target}: {first}",
                            hint="start it first (`ray start --head` on one node, `ray start --address HEAD:6379` on the "
                            "others), or use --cluster local for this machine alone") from None
    return True


# -- the pool --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolShape:
    """How many actors, and what each one asks of Ray and uses."""

    workers: int
    num_cpus: int
    num_gpus: int
    threads: int
    device: str

    def describe(self) -> str:
        what = "1 GPU and " if self.num_gpus else ""
        return f"{self.workers} worker(s), each with {what}{self.num_cpus} CPU(s) ({self.device}, {self.threads} thread(s))"


def pool_shape(nodes: list[dict[str, float]], device: str, workers: int | None) -> PoolShape:
    """The pool for a cluster whose alive nodes have the resources ``nodes`` (Ray's "CPU", "GPU").

    GPU actors (one GPU each, and the CPUs a node has per GPU, at most 8, for reading,
    preprocessing and writing) when the cluster has GPUs and ``device`` is auto or cuda; CPU
    actors otherwise, with ``CPU_THREADS_PER_WORKER`` threads each (or the CPUs shared among
    ``workers``), never more than one node has.
    """
    if device.startswith("cuda:"):
        raise InputError(f"--device {device} picks a GPU of one machine; with --cluster each worker gets a GPU of its own",
                         hint="use --device auto or --device cuda")
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    gpus = [int(n.get("GPU", 0)) for n in nodes]
    if not nodes or max(cpus + [0]) < 1:
        raise ResourceError("the Ray cluster has no node with a CPU to run a worker on")
    if device == "cuda" and not sum(gpus):
        raise ResourceError("--device cuda, but the Ray cluster has no GPU", hint="use --device auto or --device cpu")
    if device in ("auto", "cuda") and sum(gpus):
        per_gpu = max(1, min(8, min(c // g for c, g in zip(cpus, gpus) if g)))
        return PoolShape(workers or sum(gpus), per_gpu, 1, per_gpu, "cuda")
    largest = max(cpus)
    if workers:
        threads = max(1, min(largest, sum(cpus) // workers))
    else:
        threads = min(CPU_THREADS_PER_WORKER, largest)
        workers = max(1, sum(c // threads for c in cpus))
    return PoolShape(workers, threads, 0, threads, "cpu" if device == "auto" else device)


class CaseWorker:
    """A Ray actor: holds the model warm and segments the cases it is sent, one at a time.

    Threaded (two method calls at once) so that :meth:`stop` reaches a running case.
    """

    def __init__(self, template: SegmentRequest, threads: int) -> None:
        self.template, self.threads = template, threads
        self.cache, self.cancel = ModelCache(), threading.Event()
        self._set_threads()

    def _set_threads(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # per calling thread under OpenMP: set where the work runs

    def info(self) -> dict[str, Any]:
        import volseg

        return {"node": node_name(), "pid": os.getpid(), "version": __version__, "engine": volseg.__file__}

    def run(self, job: Job) -> Outcome:
        self._set_threads()
        return run_case(self.template, job, None, self.cancel, self.cache)

    def stop(self) -> None:
        """Cancel the running case (it stops between windows, writing nothing) and any later one."""
        self.cancel.set()


class WorkerPool:
    """The actors of one cohort and the loop that feeds them cases (see the module docstring)."""

    def __init__(self, template: SegmentRequest, shape: PoolShape, log: Callable[[str, str], None]) -> None:
        self.ray = import_ray()
        self.shape, self.log = shape, log
        worker = replace(template, device=shape.device)
        self._actor_class = self.ray.remote(CaseWorker).options(
            num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, max_concurrency=2, max_restarts=0,
            scheduling_strategy="SPREAD")
        self._template = worker
        # Actors that die while segmenting are always replaced (the retries of each case bound
        # those deaths); actors that fail to start are replaced only this often (a broken install).
        self.start_failures_left = max(2, 2 * shape.workers)
        self.starting: dict[Any, tuple[Any, float]] = {}  # info() ref -> (actor, since)
        self.idle: deque = deque()
        self.inflight: dict[Any, tuple[Any, Job, float]] = {}  # run() ref -> (actor, job, submitted at)
        self.last_start_error = ""
        for _ in range(shape.workers):
            self._spawn()

    def _spawn(self) -> None:
        actor = self._actor_class.remote(self._template, self.shape.threads)
        self.starting[actor.info.remote()] = (actor, time.perf_counter())

    def _replace(self, failed_to_start: bool = False) -> None:
        if failed_to_start:
            if self.start_failures_left <= 0:
                return
            self.start_failures_left -= 1
        self._spawn()

    def _started(self, ref: Any) -> None:
        actor, _ = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self.last_start_error = _first_line(exc)
            self._replace(failed_to_start=True)
            return
        self.log(f"worker pid {info['pid']} on {info['node']} ready (volseg {info['version']} from "
                 f"{Path(info['engine']).parent})", "info")
        if info["version"] != __version__:
            self.log(f"worker on {info['node']} runs volseg {info['version']}, this process {__version__}: "
                     "install the same version on every node", "warning")
        self.idle.append(actor)

    def run(self, jobs: list[Job], finish: Callable[[Job, Outcome], None], retry: Callable[[Job, str], None],
            cancel: threading.Event, retries: int) -> None:
        """Feed ``jobs`` to the actors until every one has ended (``finish`` is called for each)
        or ``cancel`` is set (the jobs never started are then left to the caller)."""
        ray = self.ray
        queue = deque(jobs)
        while queue or self.inflight:
            if cancel.is_set():
                self._stop_running(finish)
                return
            while self.idle and queue:
                actor, job = self.idle.popleft(), queue.popleft()
                job.attempts += 1
                self.inflight[actor.run.remote(job)] = (actor, job, time.perf_counter())
            waiting = list(self.inflight) + list(self.starting)
            if not waiting:
                self._give_up(queue, finish, f"no Ray worker is left to run it ({self.last_start_error or 'all died'})")
                return
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.25)
            if not ready:
                if not self.inflight and not self.idle and self._start_overdue():
                    self._give_up(queue, finish, f"no Ray worker started within {START_TIMEOUT_S:.0f} s: the cluster "
                                  f"has no room for {self.shape.describe()}")
                    return
                continue
            ref = ready[0]
            if ref in self.starting:
                self._started(ref)
                continue
            actor, job, submitted = self.inflight.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the call itself failed (not the case): no retry
                self.idle.append(actor)
                finish(job, _failed(f"the worker could not run the case: {_first_line(exc)}"))
                continue
            except ray.exceptions.RayError as exc:  # the actor's process is gone
                self._lost(actor, job, exc, queue, finish, retry, retries, cancel)
                continue
            outcome["overhead_s"] = round(max(0.0, time.perf_counter() - submitted - outcome["elapsed_s"]), 4)
            self.idle.append(actor)
            finish(job, outcome)

    def _lost(self, actor: Any, job: Job, exc: Exception, queue: deque, finish: Callable, retry: Callable,
              retries: int, cancel: threading.Event) -> None:
        """A worker died while segmenting ``job``: clean up, replace the worker, retry or fail the case."""
        self.ray.kill(actor, no_restart=True)
        discard_partial_outputs(job)
        if cancel.is_set():
            finish(job, _not_done())
            return
        self._replace()
        why = _first_line(exc)
        if job.attempts <= retries:
            retry(job, f"its worker died ({why}); trying again ({job.attempts + 1} of {retries + 1})")
            queue.appendleft(job)
        else:
            finish(job, _failed(f"its worker died {job.attempts} time(s) while segmenting it (last: {why})",
                                hint="out of memory on that node? try a smaller --roi-size or --sw-batch-size, "
                                "or fewer workers per node"))

    def _start_overdue(self) -> bool:
        return bool(self.starting) and all(time.perf_counter() - since > START_TIMEOUT_S
                                           for _, since in self.starting.values())

    def _give_up(self, queue: deque, finish: Callable, message: str) -> None:
        while queue:
            finish(queue.popleft(), _failed(message))

    def _stop_running(self, finish: Callable[[Job, Outcome], None]) -> None:
        """Cancel: ask the running cases to stop, wait for them a while, then kill what is left."""
        for actor, _, _ in self.inflight.values():
            actor.stop.remote()
        deadline = time.perf_counter() + CANCEL_GRACE_S
        while self.inflight and time.perf_counter() < deadline:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.25)
            for ref in ready:
                actor, job, _ = self.inflight.pop(ref)
                try:
                    finish(job, self.ray.get(ref))
                except self.ray.exceptions.RayError:
                    discard_partial_outputs(job)
                    finish(job, _not_done())

    def close(self) -> None:
        """Kill every actor; clean up after the cases still running (they end as not done)."""
        for actor, job, _ in self.inflight.values():
            self.ray.kill(actor, no_restart=True)
            discard_partial_outputs(job)
        for actor in [*self.idle, *(a for a, _ in self.starting.values())]:
            self.ray.kill(actor, no_restart=True)
        self.inflight.clear()
        self.idle.clear()
        self.starting.clear()


def _failed(message: str, hint: str | None = None) -> Outcome:
    return {"status": "failed", "error": {"message": message, "hint": hint, "exit_code": 1}}


def _not_done() -> Outcome:
    return {"status": "not_done", "error": {"message": "cancelled while running; nothing was written",
                                            "hint": None, "exit_code": Cancelled.exit_code}}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith(("Traceback", "  ")):
            return line.strip()[:300]
    return type(exc).__name__


def run_on_cluster(template: SegmentRequest, jobs: list[Job], settings: ClusterSettings,
                   log: Callable[[str, str], None],
                   finish: Callable[[Job, Outcome], None], retry: Callable[[Job, str], None],
                   cancel: threading.Event) -> None:
    """Run ``jobs`` on the Ray cluster ``settings.address`` (see the module docstring).

    ``log(message, level)`` reports what happens to the pool; ``finish(job, outcome)`` is called
    once per job that ends (not for jobs left when ``cancel`` is set), ``retry(job, message)``
    when a job is sent again after its worker died.
    """
    check_address(settings.address)
    if not jobs:
        return
    # Ray prints what its daemons report (a worker killed, say) on sys.stdout: send it to stderr,
    # so that stdout keeps nothing but the JSON events (the reporter holds the real stdout).
    with contextlib.redirect_stdout(sys.stderr):
        _run_on_cluster(template, jobs, settings, log, finish, retry, cancel)


def _run_on_cluster(template: SegmentRequest, jobs: list[Job], settings: ClusterSettings,
                    log: Callable[[str, str], None],
                    finish: Callable[[Job, Outcome], None], retry: Callable[[Job, str], None],
                    cancel: threading.Event) -> None:
    disconnect = connect(settings.address)
    ray = import_ray()
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        shape = pool_shape([n["Resources"] for n in alive], template.device, settings.workers)
        addresses = sorted({str(n.get("NodeManagerAddress")) for n in alive})
        shown = ", ".join(addresses[:3]) + (", ..." if len(addresses) > 3 else "")
        log(f"cluster {settings.address}: {len(alive)} node(s) ({shown}); {shape.describe()}", "info")
        pool = WorkerPool(template, shape, log)
        try:
            pool.run(jobs, finish, retry, cancel, settings.retries)
        finally:
            pool.close()
    finally:
        if disconnect:
            if settings.address == "local":
                stop_local()
            else:
                ray.shutdown()
