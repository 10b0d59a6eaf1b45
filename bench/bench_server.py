"""Benchmark the remote path: ``volseg server`` on loopback against a local warm worker.

    python bench/bench_server.py [--quick] [--repeats N] [--size I J K] [--device cpu|cuda] [--clients 4]

Baseline: one run on a local warm ``volseg serve`` worker (what the Slicer panel uses with
"keep the model loaded"): a JSON request on its stdin, wait for its ``done`` event. Rows:

- ``server, 1 client``: the same run through a local ``volseg server`` (plain HTTP on
  127.0.0.1, its own warm worker on the same device): create the job, upload the volume, follow
  the events, download the label map and its colour table, delete the job.
- ``server, N clients``: N clients submit at once; the time is the wall time of the batch / N
  (the server runs one job at a time per device, so this is the time per job under load).

Columns: median seconds per job, its ratio to the baseline, the remote overhead (seconds beyond
the baseline run) and the throughput in jobs per minute. Rounds are interleaved (baseline, one
client, N clients, again), after one untimed warm-up round that loads the model in both
workers. The input is slicerio's chest CT (128x128x34) unless ``--size`` asks for a synthetic CT
of that size (gzip NRRD; the issue's target: 512 512 300, overhead <= 2 s). Check: every remote
label map is byte-identical to the local one (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import Column

ENGINE = common.REPO_ROOT / "VolSegSlicer"


def engine_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ENGINE), VOLSEG_RUNTIME=os.environ.get("VOLSEG_RUNTIME", "torch"))


def input_volume(folder: Path, size: list[int] | None) -> Path:
    from volseg.demo.run import sample_ct

    if not size:
        return sample_ct()
    import nrrd
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.normal(-300, 300, size).astype(np.int16)
    path = folder / f"ct-{'x'.join(map(str, size))}.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.diag([0.8, 0.8, 1.5]),
                                 "space origin": [0.0, 0.0, 0.0], "encoding": "gzip"})
    return path


class LocalWorker:
    """A warm ``volseg serve`` process: one request at a time."""

    def __init__(self, device: str) -> None:
        self.device, self.n = device, 0
        from volseg.server.jobs import _die_with_parent

        self.proc = subprocess.Popen([sys.executable, "-m", "volseg", "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=engine_env(),
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def run(self, volume: Path, output: Path) -> Path:
        self.n += 1
        args = [str(volume), "--model", "demo", "-o", str(output), "--device", self.device, "--overwrite"]
        self.proc.stdin.write(json.dumps({"id": self.n, "args": args}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get("request") == self.n and event["event"] in ("done", "error"):
                if event["event"] == "error":
                    raise RuntimeError(event["message"])
                return output
        raise RuntimeError("the local worker stopped")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class LocalServer:
    """``volseg server`` on 127.0.0.1 (any free port), its state in a temporary folder."""

    def __init__(self, folder: Path, device: str, clients: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "volseg", "server", "--port", "0", "--state-dir", str(folder / "state"),
             "--device", device, "--jobs-per-token", str(clients + 2), "--max-upload-mb", "4096",
             "--max-voxels", str(2**31)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=engine_env())
        for line in self.proc.stdout:
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise RuntimeError("the server did not start")
        self.token = (folder / "state" / "tokens").read_text().split()[1]

    def run(self, volume: Path, output: Path) -> Path:
        from volseg.server.client import ServerClient

        c = ServerClient(self.url, self.token)
        job = c.create_job("demo", [".nrrd"], ".nrrd", {})["id"]
        c.upload(job, 0, volume)
        since = 0
        while True:
            answer = c.events(job, since, wait=5.0)
            since = answer["next"]
            if answer["state"] in ("done", "error", "cancelled"):
                break
        if answer["state"] != "done":
            raise RuntimeError(f"the server's job ended {answer['state']}: {answer['events'][-1:]}")
        c.download(job, "result.nrrd", output)
        c.download(job, "result.csv", output.with_suffix(".csv"))
        c.delete(job)
        return output

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, repeats=3)
    parser.add_argument("--size", type=int, nargs=3, metavar=("I", "J", "K"), help="synthetic CT of this size")
    parser.add_argument("--clients", type=int, default=4, help="clients at once in the last row (default 4)")
    args, device = common.start(parser, argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops both workers
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print('bench_server: skipped, the server needs the [server] extra (pip install "volseg[server]")')
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        folder = Path(tmp)
        volume = input_volume(folder, args.size)
        local, server = LocalWorker(str(device)), LocalServer(folder, str(device), args.clients)
        times: dict[str, list[float]] = {"local": [], "one": [], "many": []}
        outputs: list[Path] = []
        try:
            reference = local.run(volume, folder / "local.nrrd")  # warm-up round: both load the model
            outputs.append(server.run(volume, folder / "warm.nrrd"))
            for r in range(args.repeats):
                t = time.perf_counter()
                local.run(volume, folder / "local.nrrd")
                times["local"].append(time.perf_counter() - t)
                t = time.perf_counter()
                outputs.append(server.run(volume, folder / f"one{r}.nrrd"))
                times["one"].append(time.perf_counter() - t)
                errors: list[BaseException] = []

                def client(n: int, r: int = r) -> None:
                    try:
                        outputs.append(server.run(volume, folder / f"many{r}-{n}.nrrd"))
                    except BaseException as exc:
                        errors.append(exc)

                threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                if errors:
                    raise errors[0]
                times["many"].append((time.perf_counter() - t) / args.clients)
        finally:
            local.close()
            server.close()
        same = all(p.read_bytes() == reference.read_bytes() for p in outputs)
    base = statistics.median(times["local"])
    rows = []
    for key, name in (("local", "local warm worker (baseline)"), ("one", "server, 1 client"),
                      ("many", f"server, {args.clients} clients (per job)")):
        per_job = statistics.median(times[key])
        rows.append({"name": name, "seconds": per_job, "overhead": per_job - base, "per_minute": 60.0 / per_job,
                     "ok": same, "check": "identical" if same else "DIFFERS"})
    shape = "x".join(map(str, args.size)) if args.size else "128x128x34 (CTChest4)"
    print(f"\ninput {shape}, demo model, {args.repeats} round(s), device {device}\n")
    print(common.markdown_table(rows, [Column("name", "path"), Column("seconds", "s / job", "{:.2f}"),
                                       Column("overhead", "overhead s", "{:+.2f}"),
                                       Column("per_minute", "jobs / min", "{:.1f}"),
                                       Column("check", "label map vs local")],
                                baseline="local warm worker (baseline)", ratio_of=[("seconds", "x baseline")]))
    return common.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
