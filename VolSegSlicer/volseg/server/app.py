"""The server's HTTP endpoints (FastAPI). Every endpoint but ``/v1/health`` needs a bearer token.

::

    GET    /v1/health                         no token: {"status": "ok", "version": ...}
    GET    /v1/info                           host, devices, limits, queue, the token's name
    GET    /v1/models                         the cards the server has (as `volseg models --json`,
                                              without paths; "checkpoint": {"present": bool})
    POST   /v1/jobs                           {"model": ID, "inputs": [".nrrd", ...], "result": ".seg.nrrd",
                                              "options": {...}} -> {"id": ..., "uploads": [URL paths]}
    PUT    /v1/jobs/{id}/inputs/{n}           the n-th input volume as the raw request body
    GET    /v1/jobs/{id}                      the job's state
    GET    /v1/jobs/{id}/events?since=N&wait=S  events N.. (the JSON of `--progress json`), waiting up to S s
    POST   /v1/jobs/{id}/cancel               stop it (its files are removed)
    GET    /v1/jobs/{id}/files                the result files' names, once done
    GET    /v1/jobs/{id}/files/{name}         one result file
    DELETE /v1/jobs/{id}                      cancel if needed, then forget the job and remove its files

Every refusal is one JSON object ``{"error": {"status", "message", "hint"}}`` with that HTTP status.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from volseg import __version__
from volseg.server.jobs import FINAL, JobBoard, option_args
from volseg.server.limits import RESULT_SUFFIXES, VOLUME_SUFFIXES, Refusal, header_voxels
from volseg.server.tokens import TokenStore

MAX_JSON_BODY = 64 * 1024
MAX_WAIT_S = 20.0
CHUNK_WRITE = 1 << 20


class CardIndex:
    """The server's model cards, re-read at most every few seconds; summaries without paths."""

    def __init__(self, cards_dirs: list) -> None:
        self.cards_dirs = [str(d) for d in cards_dirs]
        self._at = -1e9
        self._cards: dict[str, dict] = {}
        self._problems: list[str] = []

    def cards(self) -> dict[str, dict]:
        if time.monotonic() - self._at > 5.0:
            from volseg.cards import list_cards

            cards, problems = list_cards(self.cards_dirs)
            self._cards = {}
            for card in cards:
                summary = card.summary()
                summary["checkpoint"] = {"present": bool(card.checkpoint_path and card.checkpoint_path.is_file()),
                                         "sha256": card.checkpoint_sha256,
                                         "published_at": summary["checkpoint"]["published_at"]}
                summary["card_path"] = None
                self._cards[card.id] = summary
            self._problems = [p.split(": ", 1)[-1] for p in problems]
            self._at = time.monotonic()
        return self._cards


def build_app(board: JobBoard, tokens: TokenStore, cards: CardIndex) -> FastAPI:
    """The FastAPI application over ``board`` (jobs), ``tokens`` (who may use it) and ``cards``."""
    app = FastAPI(title="volseg server", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    limits = board.limits

    @app.exception_handler(Refusal)
    async def refused(_: Request, exc: Refusal) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(Refusal(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:  # a bug or the server's disk: still one JSON error
        return JSONResponse(Refusal(500, f"the server failed ({type(exc).__name__})",
                                    hint="try again; tell the server's administrator if it persists").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())[:300]
        return JSONResponse(Refusal(400, f"malformed request ({where})").body(), status_code=400)

    def owner(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refusal(401, "this server needs a token (Authorization: Bearer TOKEN)",
                          hint="pass --token-file FILE (the token the server's administrator gave you)")
        name = tokens.who(given.strip())
        if name is None:
            raise Refusal(401, "the server does not accept this token (wrong or revoked)",
                          hint="ask the server's administrator for a valid token")
        return name

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/info")
    def info(who: str = Depends(owner)) -> dict:
        return {"host": board.host_name, "version": __version__, "token": who, **board.status(),
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_voxels": limits.max_voxels,
                           "jobs_per_token": limits.jobs_per_token, "job_time_s": limits.job_time_s,
                           "queue_length": limits.queue_length},
                "inputs": list(VOLUME_SUFFIXES), "results": list(RESULT_SUFFIXES)}

    @app.get("/v1/models")
    def models(_: str = Depends(owner)) -> dict:
        return {"models": list(cards.cards().values()), "problems": []}

    @app.post("/v1/jobs", status_code=201)
    async def create(request: Request, who: str = Depends(owner)) -> dict:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BODY:
                raise Refusal(413, "the job description is larger than 64 KB")
        try:
            spec = json.loads(body)
        except ValueError:
            raise Refusal(400, "the job description is not JSON",
                          hint='send {"model": ID, "inputs": [".nrrd"], "result": ".seg.nrrd"}') from None
        if not isinstance(spec, dict):
            raise Refusal(400, "the job description must be a JSON object")
        unknown = set(spec) - {"model", "inputs", "result", "options"}
        if unknown:
            raise Refusal(400, f"unknown field(s) in the job description: {', '.join(sorted(unknown))[:200]}")
        model = spec.get("model")
        known = cards.cards()
        if not isinstance(model, str) or model not in known:
            raise Refusal(400, f"this server has no model {str(model)[:80]!r}",
                          hint="the server's models: " + ", ".join(sorted(known)[:40]))
        card = known[model]
        if not card["checkpoint"]["present"]:
            raise Refusal(400, f"the server has no checkpoint for model {model!r}",
                          hint="ask the server's administrator to install its weights")
        inputs = spec.get("inputs")
        if (not isinstance(inputs, list) or len(inputs) != len(card["inputs"])
                or not all(isinstance(s, str) and s in VOLUME_SUFFIXES for s in inputs)):
            raise Refusal(400, f"model {model!r} needs {len(card['inputs'])} input(s), each one of "
                          + ", ".join(VOLUME_SUFFIXES), hint="DICOM series: convert to NRRD or NIfTI first")
        result = spec.get("result", ".seg.nrrd")
        if result not in RESULT_SUFFIXES:
            raise Refusal(400, f"result format {str(result)[:40]!r} is not offered",
                          hint="use one of " + ", ".join(RESULT_SUFFIXES))
        job = board.create(who, model, inputs, result, option_args(spec.get("options")))
        return {"id": job.id, "uploads": [f"/v1/jobs/{job.id}/inputs/{i}" for i in range(len(inputs))]}

    @app.put("/v1/jobs/{job_id}/inputs/{index}")
    async def upload(job_id: str, index: str, request: Request, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        if not index.isdigit() or int(index) >= len(job.inputs):
            raise Refusal(400, f"this job has inputs 0..{len(job.inputs) - 1}, not {index[:20]!r}")
        n = int(index)
        if job.state != "uploading" or job.inputs[n] is not None:
            raise Refusal(409, f"input {n} of this job was uploaded already, or the job has started")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(400, "the Content-Length header is not a number")
            if int(declared) > limits.max_upload_bytes:
                raise Refusal(413, f"the upload ({int(declared):,} bytes) is larger than this server accepts "
                              f"({limits.max_upload_bytes:,} bytes)", hint="compress the volume (.nii.gz or gzip NRRD)")
        suffix = job.input_suffixes[n]
        part = job.folder / f".input{n}.part"
        target = job.folder / f"input{n}{suffix}"
        fd, head, total, checked = None, b"", 0, False
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limits.max_upload_bytes:
                    raise Refusal(413, f"the upload is larger than this server accepts ({limits.max_upload_bytes:,} bytes)")
                if not checked:
                    head += chunk
                    if header_voxels(head, suffix, False, limits) is None:
                        continue
                    checked, chunk = True, head
                    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                for start in range(0, len(chunk), CHUNK_WRITE):
                    os.write(fd, chunk[start:start + CHUNK_WRITE])
            if not checked:
                if not head:
                    raise Refusal(400, "the upload is empty")
                header_voxels(head, suffix, True, limits)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                os.write(fd, head)
            os.close(fd)
            fd = None
            if job.state != "uploading":  # cancelled meanwhile
                raise Refusal(409, "the job was cancelled during the upload")
            os.replace(part, target)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                fd = None
            if part.exists():
                part.unlink()
            if job.state != "uploading":
                raise Refusal(409, "the job was cancelled during the upload") from None
            raise Refusal(507, f"the server could not store the upload ({exc.strerror or type(exc).__name__})",
                          hint="try again later; the server's disk may be full") from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            if part.exists():
                part.unlink()
            raise
        job.inputs[n] = target
        if all(p is not None for p in job.inputs):
            try:
                board.enqueue(job)
            except Refusal:
                board.delete(job)
                raise
        return {"id": job.id, "received": total, "state": job.state, "queue_position": board.position(job)}

    @app.get("/v1/jobs/{job_id}")
    def job_state(job_id: str, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        return job.public(board.position(job))

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: str, since: int = 0, wait: float = 0.0, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        since = max(0, since)
        end = time.monotonic() + min(max(0.0, wait), MAX_WAIT_S)
        with job.changed:
            while len(job.events) <= since and job.state not in FINAL:
                left = end - time.monotonic()
                if left <= 0:
                    break
                job.changed.wait(left)
            batch = job.events[since:]
            state = job.state
        return {"events": batch, "next": since + len(batch), "state": state, "queue_position": board.position(job)}

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        board.cancel(job)
        return job.public()

    @app.get("/v1/jobs/{job_id}/files")
    def files(job_id: str, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        if job.state != "done":
            raise Refusal(409, f"the job is {job.state}; results come once it is done")
        return {"files": job.result_files()}

    @app.get("/v1/jobs/{job_id}/files/{name}")
    def result_file(job_id: str, name: str, who: str = Depends(owner)) -> Any:
        job = board.get(job_id, who)
        if job.state != "done" or name not in job.result_files():
            raise Refusal(404, f"this job has no result file {name[:80]!r}", hint="GET /v1/jobs/ID/files lists them")
        return FileResponse(job.folder / name, media_type="application/octet-stream")

    @app.delete("/v1/jobs/{job_id}")
    def delete(job_id: str, who: str = Depends(owner)) -> dict:
        job = board.get(job_id, who)
        board.delete(job)
        return {"id": job.id, "state": job.state, "removed": True}

    return app
