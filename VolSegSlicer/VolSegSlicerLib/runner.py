"""Running the engine for the panel: model and device queries, segmentation jobs, the warm worker.

A run goes: the input volumes are written to a fresh temporary folder (uncompressed NRRD, local
coordinates), ``volseg segment ... --progress json`` runs in a process of its own (or as one
request to the warm ``volseg serve`` worker), its events are read by :meth:`EngineRunner.poll`
(the module calls it from a timer, so the GUI never waits), and when the engine is done the
label map is imported by :func:`~VolSegSlicerLib.results.import_result`. Whatever the outcome,
the temporary folder is removed and ``on_finished(job)`` is called once.

Failures leave the scene as it was: an engine error or a cancel imports nothing; a result that
does not fit is refused by the import before any node is made; an input volume removed from
the scene during the run cancels the engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from VolSegSlicerLib.bundle_trust import (CodeReport, TrustStore, code_query_args, parse_code_report,
                                          run_arguments, trust_decision)
from VolSegSlicerLib.catalog import duplicate_inputs, input_titles, parse_models_json
from VolSegSlicerLib.command import engine_command, engine_environment, segment_args, serve_request_line
from VolSegSlicerLib.devices import device_choices, fallback_choices
from VolSegSlicerLib.jobs import EngineQuery, SegmentationJob
from VolSegSlicerLib.mrml import MRMLContext, node_in_scene, write_volume_file
from VolSegSlicerLib.process import EngineProcess, python_executable
from VolSegSlicerLib.remote import ServerTarget
from VolSegSlicerLib.results import import_result
from VolSegSlicerLib.settings import RunSettings, segment_options

log = logging.getLogger("VolSegSlicer")


class EngineRunner:
    """Starts and follows the engine's processes for one scene.

    Args:
        context: the scene and logics results are imported into.
        module_dir: the folder holding ``volseg/`` (put first on the engine's PYTHONPATH).
        temp_root: where run folders are made (Slicer's temporary folder; default: the system's).
        base_environment: returns the environment to start the engine in (Slicer's startup
            environment); default: this process's.
        on_activity: called when a job is added, so the caller can start its polling timer.
    """

    def __init__(self, context: MRMLContext, module_dir: str, temp_root: str | None = None,
                 base_environment: Optional[Callable[[], dict]] = None,
                 on_activity: Optional[Callable[[], None]] = None) -> None:
        self.context = context
        self.module_dir = str(module_dir)
        self.temp_root = temp_root or tempfile.gettempdir()
        self.base_environment = base_environment
        self.on_activity = on_activity
        self.jobs: list = []
        self.models: list[dict] = []
        self.warm_worker: Optional[EngineProcess] = None
        self._request_counter = 0
        #: The server for runs with ``runOn == "server"`` (VolSegSlicerLib.remote; the panel sets it
        #: from the application settings).
        self.server: Optional[ServerTarget] = None
        self._working_dir: Optional[str] = None

    # ------------------------------------------------------------------ processes
    def start_engine(self, args: Sequence[str], stdin_pipe: bool = False,
                     extra_env: Optional[dict] = None) -> EngineProcess:
        """Start ``python -m volseg ARGS`` in the background (``extra_env``: e.g. the server token,
        which is never on the command line, so never in the log)."""
        argv = engine_command(python_executable(), args)
        log.info("VolSegSlicer: %s", " ".join(argv))
        base = self.base_environment() if self.base_environment else None
        env = {**engine_environment(self.module_dir, base), **(extra_env or {})}
        return EngineProcess(argv, env=env, cwd=self.working_dir(), stdin_pipe=stdin_pipe).start()

    def _remote(self) -> ServerTarget:
        if self.server is None:
            raise ValueError("Run on is 'server' but no server is set: give its address and token.")
        self.server.check()
        return self.server

    def working_dir(self) -> str:
        """The engine's working folder: a fresh one only this user can enter (mode 0700), made
        on first use and removed by :meth:`shutdown` -- never the shared temporary folder, where
        another user could plant a ``volseg/`` package for ``python -m`` to find."""
        if self._working_dir is None or not os.path.isdir(self._working_dir):
            self._working_dir = tempfile.mkdtemp(prefix="VolSegSlicer-engine-", dir=self.temp_root)
        return self._working_dir

    def _track(self, job: Any) -> None:
        self.jobs.append(job)
        if self.on_activity:
            self.on_activity()

    def poll(self) -> bool:
        """Read new output of every job (never blocks); finish the ones that ended. Returns
        whether jobs remain (the caller's timer can stop when not)."""
        for job in list(self.jobs):
            try:
                if isinstance(job, SegmentationJob):
                    self._check_inputs_still_there(job)
                ended = job.poll()
            except Exception as exc:  # a bug must not leave the timer firing forever
                log.exception("VolSegSlicer: polling failed")
                ended = True
                if isinstance(job, SegmentationJob):
                    job.monitor.outcome, job.monitor.error = "error", str(exc)
            if ended:
                self.jobs.remove(job)
                self._finish(job)
        return bool(self.jobs)

    def wait_for(self, job: Any, timeout: float = 3600.0,
                 process_events: Optional[Callable[[], None]] = None) -> Any:
        """Block until ``job`` ends (scripts, tests, self-tests); ``process_events`` keeps a GUI
        painted. On time-out the job is cancelled and TimeoutError raised."""
        end = time.monotonic() + timeout
        while job in self.jobs:
            self.poll()
            if process_events:
                process_events()
            if time.monotonic() > end:
                job.cancel()
                raise TimeoutError(f"the engine did not finish within {timeout:g} s")
            time.sleep(0.05)
        return job

    def _check_inputs_still_there(self, job: SegmentationJob) -> None:
        if job.cancelRequested or job.finished:
            return
        gone = [volume for volume in job.inputVolumes if not node_in_scene(self.context, volume)]
        if gone:
            job.abandonReason = ("an input volume was removed from the scene while the model ran; "
                                 "the run was stopped and nothing was imported")
            job.cancel()

    def _finish(self, job: Any) -> None:
        if isinstance(job, EngineQuery):
            job.deliver()
            return
        try:
            if job.abandonReason:
                job.monitor.outcome, job.monitor.error = "error", job.abandonReason
            elif job.monitor.outcome == "done" and not job.cancelRequested:
                self._import(job)
        finally:
            job.finished = True
            if job.ownsProcess:
                job.process.close()
            elif not job.process.is_running() and self.warm_worker is job.process:
                self.warm_worker = None  # the warm worker died or was killed: a new one starts next time
            if job.tempDir:
                shutil.rmtree(job.tempDir, ignore_errors=True)
            if job.onFinished:
                try:
                    job.onFinished(job)
                except Exception:  # the panel's callback must not stop the other jobs
                    log.exception("VolSegSlicer: the end-of-run callback failed")

    def _import(self, job: SegmentationJob) -> None:
        provenance = {"Device": job.monitor.result.get("device", ""), "Checkpoint": job.checkpoint,
                      "ModelTitle": job.model.get("title", "")}
        try:
            job.segmentationNode = import_result(self.context, job.outputPath, job.model, job.inputVolume,
                                                 job.outputSegmentation, job.replace, provenance)
        except Exception as exc:  # ResultError, or a Slicer failure: the scene is unchanged
            log.info("VolSegSlicer: importing the result failed: %s", exc)
            job.monitor.outcome, job.monitor.error = "error", f"importing the result failed: {exc}"

    # ------------------------------------------------------------------ queries
    def query_models(self, cards_dir: str, callback: Callable, on_server: bool = False) -> EngineQuery:
        """Run ``volseg models --json`` in the background (``on_server``: the models of
        :attr:`server`); then ``callback(models or None, error)``."""
        args = ["models", "--json"] + (["--cards-dir", cards_dir] if cards_dir and not on_server else [])
        extra_env = None
        if on_server:
            args += self._remote().arguments()
            extra_env = self.server.environment()

        def parse(text: str) -> list[dict]:
            self.models = parse_models_json(text)
            return self.models

        query = EngineQuery(self.start_engine(args, extra_env=extra_env), parse, callback)
        self._track(query)
        return query

    def query_bundle_code(self, path: str, callback: Callable[[Optional[CodeReport], str], None]) -> EngineQuery:
        """Run ``volseg bundle-code PATH --json`` in the background (nothing of the bundle runs);
        then ``callback(CodeReport or None, error)``."""
        query = EngineQuery(self.start_engine(code_query_args(path)), parse_code_report, callback)
        self._track(query)
        return query

    def query_devices(self, callback: Callable) -> EngineQuery:
        """Run ``volseg devices --json`` in the background; then ``callback(DeviceChoices)``."""

        def deliver(result, error):
            callback(result if result is not None else fallback_choices(
                f"Could not ask the engine about devices ({error}); automatic choice is used."))

        query = EngineQuery(self.start_engine(["devices", "--json"]), device_choices, deliver)
        self._track(query)
        return query

    # ------------------------------------------------------------------ segmentation
    def segment(self, model: dict, input_volumes: Sequence[Any], settings: Any, cards_dir: str = "",
                on_event: Optional[Callable] = None, on_finished: Optional[Callable] = None,
                wait: bool = False, trust: Optional[TrustStore] = None) -> SegmentationJob:
        """Start segmenting ``input_volumes`` (one per card input) with ``model`` (an entry of
        ``volseg models --json``) and the panel's ``settings`` (a parameter node or
        :class:`RunSettings`). Returns at once unless ``wait``; ``job.segmentationNode`` is set
        once the result is imported.

        ``trust`` (the panel's remembered decisions): a MONAI bundle runs only as
        :func:`~VolSegSlicerLib.bundle_trust.trust_decision` allows, with its own code only where
        the user trusted it at its current digest; without ``trust`` no bundle code runs.

        Raises:
            ValueError: no model, or the inputs do not fit the card (nothing was started).
            NeedsTrust: the bundle must be asked about first (a ValueError; nothing was started).
            BundleError: the bundle's path is a link or the bundle cannot be read.
            OSError: an input could not be written for the engine.
        """
        if not model:
            raise ValueError("Select a model first.")
        titles = input_titles(model)
        if len(input_volumes) != len(titles) or not all(input_volumes):
            raise ValueError(f"This model needs {len(titles)} input volume(s): {', '.join(titles)}.")
        if duplicate_inputs([v.GetID() for v in input_volumes]):
            raise ValueError("The same volume is selected for two inputs; each input needs its own.")
        for volume in input_volumes:
            image = volume.GetImageData()
            if image is None or 0 in image.GetDimensions():
                raise ValueError(f"'{volume.GetName()}' has no image data; load or select another volume.")
        settings = RunSettings.of(settings)
        remote = settings.runOn == "server"
        trusted = {}
        if trust is not None and not remote:  # the server runs its own models: no local bundle code
            trusted = run_arguments(trust_decision(model, trust))
        if remote:  # the server's own weights and device: the local checkpoint and device do not apply
            target = self._remote()
            settings.checkpointPath, settings.device = "", "auto"
        temp_dir = tempfile.mkdtemp(prefix="VolSegSlicer-", dir=self.temp_root)
        try:
            input_paths = []
            for index, volume in enumerate(input_volumes):
                input_paths.append(os.path.join(temp_dir, f"input{index}.nrrd"))
                write_volume_file(volume, input_paths[-1])
            output_path = os.path.join(temp_dir, "segmentation.nrrd")
            options = segment_options(model, input_paths, output_path, settings, cards_dir)
            options.trusted_bundle_digest = trusted.get("trusted_bundle_digest", "")
            if remote:  # `volseg segment --server`: uploads, relays the server's events, writes here
                options.model, options.cards_dir, options.device = model["id"], "", "auto"
                options.extra = target.arguments()
                job = SegmentationJob(self.start_engine(segment_args(options), extra_env=target.environment()),
                                      onEvent=on_event, onFinished=on_finished)
            elif settings.keepWarm:
                worker = self.ensure_warm_worker()
                self._request_counter += 1
                request = f"slicer-{self._request_counter}"
                worker.send_line(serve_request_line(request, options))
                job = SegmentationJob(worker, request=request, ownsProcess=False,
                                      onEvent=on_event, onFinished=on_finished)
            else:
                job = SegmentationJob(self.start_engine(segment_args(options)), onEvent=on_event,
                                      onFinished=on_finished)
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        job.tempDir, job.outputPath, job.model = temp_dir, output_path, model
        job.inputVolumes = list(input_volumes)
        job.checkpoint = settings.checkpointPath
        job.outputSegmentation = settings.outputSegmentation
        job.replace = settings.replaceOutput
        self._track(job)
        if wait:
            self.wait_for(job)
        return job

    def ensure_warm_worker(self) -> EngineProcess:
        """The ``volseg serve`` process that keeps models loaded between runs (started on demand)."""
        if self.warm_worker is None or not self.warm_worker.is_running():
            self.warm_worker = self.start_engine(["serve"], stdin_pipe=True)
        return self.warm_worker

    def stop_warm_worker(self) -> None:
        if self.warm_worker is not None:
            self.warm_worker.close()
            self.warm_worker = None

    def shutdown(self) -> None:
        """Stop everything this runner started (module cleanup / reload); every segmentation
        still running ends as cancelled, with its ``on_finished`` called."""
        for job in list(self.jobs):
            if isinstance(job, SegmentationJob):
                job.cancelRequested = True
                job.monitor.process_exited(None, cancel_requested=True)
            job.process.kill()
        for job in list(self.jobs):
            self.jobs.remove(job)
            if isinstance(job, SegmentationJob):
                self._finish(job)
        self.stop_warm_worker()
        if self._working_dir is not None:
            shutil.rmtree(self._working_dir, ignore_errors=True)
            self._working_dir = None
