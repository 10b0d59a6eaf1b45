"""``volseg server``: the HTTP server for a shared GPU (``pip install "volseg[server]"``)."""

from __future__ import annotations

import argparse

SERVER_DESCRIPTION = """Serve segmentation over HTTP(S) to `volseg segment --server` and Slicer's panel
(Run on: server). Every request but /v1/health needs a bearer token; the first start makes one
and keeps it in STATE_DIR/tokens (mode 0600): one 'NAME TOKEN' per line, delete a line to revoke
it (no restart). Listens on 127.0.0.1 unless --host; another address needs --tls-cert/--tls-key
(or --insecure-http). Jobs run one at a time per --device through a warm `volseg serve` worker."""


def add_server_parser(sub) -> None:
    p = sub.add_parser("server", help="serve segmentation to other machines over HTTP(S)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SERVER_DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8443, help="port (default 8443; 0: any free port)")
    p.add_argument("--tls-cert", help="TLS certificate (PEM)")
    p.add_argument("--tls-key", help="TLS private key (PEM)")
    p.add_argument("--insecure-http", action="store_true", help="allow plain HTTP on a non-loopback address")
    p.add_argument("--models-dir", action="append", default=[], metavar="FOLDER",
                   help="folder of model cards to offer (besides the bundled ones)")
    p.add_argument("--device", action="append", metavar="DEVICE",
                   help="a device to run jobs on, one worker each (repeat: --device cuda:0 --device cuda:1; default auto)")
    p.add_argument("--state-dir", help="the server's private folder: tokens, job folders (default ~/.volseg-server)")
    p.add_argument("--tokens-file", help="the tokens file (default STATE_DIR/tokens)")
    p.add_argument("--add-token", metavar="NAME", help="add a token with this name to the tokens file, print it, exit")
    p.add_argument("--name", help="the name clients see for this server (default the host name)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-upload-mb", type=float, default=2048, help="largest upload per input volume (default 2048)")
    lim.add_argument("--max-voxels", type=int, default=512 * 512 * 2048, help="most voxels per input (from its header)")
    lim.add_argument("--jobs-per-token", type=int, default=4, help="unfinished jobs per token (default 4)")
    lim.add_argument("--job-time", type=float, default=1800, help="seconds a job may run (default 1800)")
    lim.add_argument("--queue-length", type=int, default=32, help="jobs that may wait (default 32)")
    lim.add_argument("--keep", type=float, default=3600, help="seconds unfetched results are kept (default 3600)")


def add_remote_options(p: argparse.ArgumentParser) -> None:
    """``--server URL --token-file F --ca-cert PEM``: run on a volseg server instead of here."""
    g = p.add_argument_group("remote (volseg server)")
    g.add_argument("--server", metavar="URL", help="run on this volseg server (https://host:port) instead of here")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding the server token (default: the VOLSEG_SERVER_TOKEN environment variable)")
    g.add_argument("--ca-cert", metavar="PEM", help="certificate authority to verify the server with (a private CA)")


def cmd_server(args: argparse.Namespace) -> int:
    from volseg.server.main import run_server

    return run_server(args)
