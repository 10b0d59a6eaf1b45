"""The client of ``volseg server`` (standard library only): ``volseg segment --server`` and the
Slicer panel's "Run on: server" (the panel runs ``volseg segment --server`` as its background
process, so progress, cancel and the imported result work as for a local run).

A remote run: check the arguments and the output here, ``GET /v1/info`` (token, limits), create
the job, upload each input as a raw body, follow its events (the JSON of ``--progress json``,
relayed to the local reporter), download the result files into a hidden staging name beside
the output and move them into place together, then delete the job on the server. Connection
losses are retried with backoff for ``lost_after_s`` seconds; a job the server no longer knows
(it restarted) or a server gone for longer ends the run with a clear error and nothing written.
SIGINT/SIGTERM cancel the job on the server too. Server refusals become the engine's exit codes.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from volseg.errors import Cancelled, InputError, OutputError, ResourceError, VolSegError

#: Formats an input must have to be uploaded (the server accepts these).
UPLOAD_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
RESULT_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
TOKEN_ENV = "VOLSEG_SERVER_TOKEN"
CHUNK = 1 << 20


class RemoteError(VolSegError):
    """The server refused a request, or could not be reached (exit code by cause)."""


class ServerLost(ResourceError):
    """The server went away during a run (exit code 3); nothing was written."""


_EXIT_CODES = {400: 2, 401: 2, 403: 2, 404: 2, 409: 2, 413: 2, 429: 3, 503: 3}


def read_token(token_file: str | None) -> str:
    """The token: from ``token_file`` (a regular file, first line) or ``$VOLSEG_SERVER_TOKEN``."""
    if token_file:
        path = Path(token_file)
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise InputError(f"token file {path} is not a regular file")
            with open(path, encoding="utf-8") as f:
                text = f.read(4096)
        except OSError as exc:
            raise InputError(f"cannot read the token file {path}: {exc.strerror}") from None
        token = (text.strip().split() or [""])[-1] if text.strip() else ""
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise InputError("no server token given", hint=f"pass --token-file FILE or set {TOKEN_ENV}")
    return token


def _suffix(path: Path, choices) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(choices, key=len, reverse=True) if name.endswith(s)), None)


class ServerClient:
    """Requests to one server with one token.

    Args:
        url: ``https://host:port`` (or ``http://`` for a loopback or trusted network).
        token: the bearer token.
        ca_cert: a PEM file of the certificate authority that signed the server's certificate.
        timeout: seconds one request may take.
        lost_after_s: how long connection failures are retried (with backoff) before giving up.
    """

    def __init__(self, url: str, token: str, ca_cert: str | None = None, timeout: float = 60.0,
                 lost_after_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server URL {url!r} is not http(s)://HOST[:PORT]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise InputError(f"server URL {url!r} must be only scheme, host and port")
        self.url, self.token, self.timeout, self.lost_after_s = url.rstrip("/"), token, timeout, lost_after_s
        self.host, self.port, self.https = parts.hostname, parts.port, parts.scheme == "https"
        self.context = None
        if self.https:
            try:
                self.context = ssl.create_default_context(cafile=ca_cert)
            except (OSError, ssl.SSLError) as exc:
                raise InputError(f"cannot use the CA certificate {ca_cert}: {exc}") from None

    # -- one request ----------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                sink: Callable[[bytes], None] | None = None, retry: bool = True) -> Any:
        """One request; the JSON answer (or ``sink`` gets the body). Connection failures are
        retried for ``lost_after_s`` when ``retry``; refusals raise :class:`RemoteError`."""
        delay, give_up = 0.2, time.monotonic() + self.lost_after_s
        while True:
            try:
                return self._once(method, path, body, headers, sink)
            except ssl.SSLCertVerificationError as exc:
                raise RemoteError(f"the server's certificate was not accepted: {exc.verify_message}",
                                  hint="pass --ca-cert with the certificate of the authority that signed it") from None
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as exc:
                if isinstance(exc, VolSegError):
                    raise
                if not retry or time.monotonic() + delay > give_up:
                    raise ServerLost(f"lost the connection to the server {self.url} ({type(exc).__name__}: "
                                     f"{exc}); nothing was written",
                                     hint="check that the server runs and is reachable, then run again") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _once(self, method, path, body, headers, sink) -> Any:
        conn = self._connection()
        try:
            head = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            if isinstance(body, (dict, list)):
                body, head["Content-Type"] = json.dumps(body).encode(), "application/json"
            try:
                conn.request(method, path, body=body, headers=head)
            except (BrokenPipeError, ConnectionResetError):
                # the server answered before the whole body was sent (a refused upload): its answer says why
                try:
                    response = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    response = None
                if response is not None and response.status >= 400:
                    raise self._refusal(response.status, response.read(1 << 16)) from None
                raise
            response = conn.getresponse()
            if response.status >= 400:
                raise self._refusal(response.status, response.read(1 << 16))
            if sink is not None:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        return None
                    sink(chunk)
            return json.loads(response.read() or b"null")
        finally:
            conn.close()

    def _refusal(self, status: int, raw: bytes) -> RemoteError:
        try:
            error = json.loads(raw)["error"]
            message, hint = str(error["message"]), error.get("hint")
        except (ValueError, KeyError, TypeError):
            message, hint = f"the server answered HTTP {status}", None
        err = RemoteError(f"the server refused: {message}" if status != 404 else message, hint=hint)
        err.exit_code = _EXIT_CODES.get(status, 3 if status >= 500 else 2)
        err.status = status
        return err

    # -- the calls ----------------------------------------------------------------------------
    def info(self) -> dict:
        return self.request("GET", "/v1/info")

    def models(self) -> dict:
        return self.request("GET", "/v1/models")

    def create_job(self, model: str, input_suffixes: list[str], result_suffix: str, options: dict) -> dict:
        return self.request("POST", "/v1/jobs", {"model": model, "inputs": input_suffixes, "result": result_suffix,
                                                 "options": options}, retry=False)

    def upload(self, job_id: str, index: int, path: Path, cancel: threading.Event | None = None) -> dict:
        size = path.stat().st_size

        def body():
            with open(path, "rb") as f:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    chunk = f.read(CHUNK)
                    if not chunk:
                        return
                    yield chunk

        return self.request("PUT", f"/v1/jobs/{_q(job_id)}/inputs/{index}", body(),
                            {"Content-Length": str(size), "Content-Type": "application/octet-stream"}, retry=False)

    def events(self, job_id: str, since: int, wait: float) -> dict:
        return self.request("GET", f"/v1/jobs/{_q(job_id)}/events?since={since}&wait={wait:g}")

    def files(self, job_id: str) -> list[str]:
        return self.request("GET", f"/v1/jobs/{_q(job_id)}/files")["files"]

    def download(self, job_id: str, name: str, target: Path) -> None:
        with open(target, "wb") as f:
            self.request("GET", f"/v1/jobs/{_q(job_id)}/files/{_q(name)}", sink=f.write, retry=False)

    def cancel(self, job_id: str) -> None:
        self.request("POST", f"/v1/jobs/{_q(job_id)}/cancel", retry=False)

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{_q(job_id)}", retry=False)


def _q(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def client_from_args(args) -> ServerClient:
    lost = float(os.environ.get("VOLSEG_SERVER_RETRY_S", "60"))
    return ServerClient(args.server, read_token(args.token_file), args.ca_cert, lost_after_s=lost)


def _refuse_local_only(args) -> None:
    local_only = [("checkpoint", "--checkpoint"), ("arch", "--arch"), ("probabilities", "--probabilities"),
                  ("trust_pickle", "--trust-pickle")]
    for name, flag in local_only:
        if getattr(args, name, None):
            raise InputError(f"{flag} is not available with --server: the server runs only its own model cards",
                             hint="see the server's models with `volseg models --server URL`")
    if getattr(args, "cards_dir", None):
        raise InputError("--cards-dir is not available with --server: the server runs only its own model cards")
    if (getattr(args, "device", "auto") or "auto") != "auto":
        raise InputError("--device is chosen by the server with --server", hint="leave --device out")


def remote_options(args) -> dict:
    """The run options a client sends (the server checks their values)."""
    options = {"roi_size": list(args.roi_size) if args.roi_size else None, "overlap": args.overlap,
               "sw_batch_size": args.sw_batch_size, "flips": args.flips, "amp": args.amp,
               "keep_largest": args.keep_largest, "fill_holes": args.fill_holes, "min_island_mm3": args.min_island_mm3}
    return {k: v for k, v in options.items() if v is not None}


def segment_remote(args, reporter, cancel: threading.Event) -> dict:
    """``volseg segment ... --server URL``: the run on the server, the results written here."""
    from volseg.io.atomic import atomic_outputs
    from volseg.io.outputs import check_segmentation_output, segmentation_outputs

    _refuse_local_only(args)
    if not args.model:
        raise InputError("no model given", hint="pass --model ID (see `volseg models --server URL`)")
    inputs = [Path(p) for p in args.inputs]
    suffixes = []
    for path in inputs:
        suffix = _suffix(path, UPLOAD_SUFFIXES)
        if suffix is None or not path.is_file():
            raise InputError(f"{path} is not a volume file this client can upload",
                             hint="with --server, inputs are .nrrd, .nii, .nii.gz or .mha files (convert DICOM first)")
        suffixes.append(suffix)
    output = Path(args.output)
    result_suffix = _suffix(output, RESULT_SUFFIXES)
    if result_suffix is None:
        raise OutputError(f"cannot write {output.name} from a server run", hint="use one of " + ", ".join(RESULT_SUFFIXES))
    outputs = check_segmentation_output(output, args.overwrite)
    client = client_from_args(args)
    info = client.info()
    reporter.log(f"server {info.get('host')} ({client.url}), devices {', '.join(info.get('devices', []))}")
    most = int(info.get("limits", {}).get("max_upload_bytes") or 0)
    for path in inputs:
        if most and path.stat().st_size > most:
            err = RemoteError(f"{path.name} ({path.stat().st_size:,} bytes) is larger than the server accepts "
                              f"({most:,} bytes)", hint="compress the volume (.nii.gz or gzip NRRD)")
            raise err
    job = client.create_job(args.model, suffixes, result_suffix, remote_options(args))
    job_id = job["id"]
    try:
        reporter.stage("upload", f"uploading {len(inputs)} input(s) to {info.get('host')}")
        for index, path in enumerate(inputs):
            client.upload(job_id, index, path, cancel)
        reporter.stage("queue", "waiting for the server's device")
        done = _follow(client, job_id, reporter, cancel)
        reporter.stage("download", "downloading the result")
        names = client.files(job_id)
        remote = [p.name for p in segmentation_outputs(Path("result" + result_suffix))]
        if sorted(names) != sorted(remote):
            raise ServerLost(f"the server's result files {names} are not the expected {remote}; nothing was written")
        with atomic_outputs(outputs, args.overwrite) as temps:
            for name, temp in zip(remote, temps):
                if cancel.is_set():
                    raise Cancelled()
                client.download(job_id, name, temp)
    except BaseException:
        try:
            client.delete(job_id)  # cancels it when it still runs; removes its files on the server
        except VolSegError:
            pass
        raise
    try:
        client.delete(job_id)
    except VolSegError:
        pass
    server = done.get("server", {})
    where = f"on {server.get('host', info.get('host'))}: {done.get('where') or server.get('device')}"
    host = server.get("host", info.get("host"))
    result = {"outputs": {"segmentation": str(output), "probabilities": None}, "device": f"{host}: {done.get('device')}",
              "where": where, "labels_present": done.get("labels_present", []), "server": server,
              "remote_timings": done.get("timings", {})}
    reporter.done(**result)
    return result


def _follow(client: ServerClient, job_id: str, reporter, cancel: threading.Event) -> dict:
    """Relay the job's events until it ends; returns its ``done`` event or raises its error."""
    since = 0
    while True:
        if cancel.is_set():
            client.cancel(job_id)
            raise Cancelled("cancelled; the job was stopped on the server and nothing was written")
        try:
            answer = client.events(job_id, since, wait=1.0)
        except RemoteError as err:
            if getattr(err, "status", None) == 404:
                raise ServerLost("the server no longer knows this job (it restarted, or the job expired); "
                                 "nothing was written", hint="run again") from None
            raise
        for event in answer["events"]:
            kind = event.get("event")
            if kind == "done":
                return event
            if kind == "error":
                err = VolSegError(str(event.get("message", "the job failed on the server")), event.get("hint"))
                err.exit_code = int(event.get("exit_code") or 1)
                raise err
            if kind == "stage":  # timed here too, so the done event's timings are the wall clock's
                reporter.stage(str(event.get("stage")), str(event.get("message", "")))
            elif kind in ("progress", "log"):
                reporter.emit(event)
        since = answer["next"]
        if answer["state"] in ("error", "cancelled") and not answer["events"]:
            raise VolSegError(f"the job ended on the server ({answer['state']})")
