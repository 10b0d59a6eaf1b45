"""``volseg server``: a shared GPU for many Slicers (optional extra ``volseg[server]``).

- :mod:`volseg.server.tokens`: who may use it (named bearer tokens in a 0600 file, re-read on change).
- :mod:`volseg.server.limits`: upload size, voxel count from a volume's header, jobs per token, job time.
- :mod:`volseg.server.jobs`: per-job private folders, the bounded queue and the warm ``volseg serve`` workers.
- :mod:`volseg.server.app`: the HTTP endpoints (FastAPI), started by :mod:`volseg.server.main`.
- :mod:`volseg.server.client`: the client (standard library only) behind ``volseg segment --server``
  and the Slicer panel's "Run on: server".

Only ``app`` and ``main`` import FastAPI/uvicorn; the client and the checks import neither.
"""
