"""Starting the server: tokens, address and TLS checks, the workers, uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from volseg.errors import InputError, VolSegError
from volseg.server.limits import ServerLimits
from volseg.server.tokens import TokenStore, add_token


def default_state_dir() -> Path:
    return Path(os.environ.get("VOLSEG_SERVER_HOME") or Path.home() / ".volseg-server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, tls: bool, insecure_http: bool) -> str | None:
    """Refuse a non-loopback address without TLS unless ``insecure_http``; returns a warning or None."""
    if is_loopback(host) or tls:
        return None
    if not insecure_http:
        raise InputError(f"listening on {host} without TLS would send images and tokens in clear text",
                         hint="give --tls-cert and --tls-key, or --insecure-http if the network is trusted")
    return (f"warning: listening on {host} over plain HTTP (--insecure-http): images and tokens cross the "
            "network unencrypted")


def private_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise InputError(f"{path} is not a folder")
    if os.name != "nt" and info.st_uid != os.getuid():
        raise InputError(f"{path} belongs to another user", hint="choose a --state-dir of your own")
    os.chmod(path, 0o700)
    return path


def prepare_tokens(tokens_file: Path) -> tuple[TokenStore, str | None]:
    """The token store; at first start (no file, or no token in it) a 256-bit token named
    ``default`` is made and returned so it can be shown once."""
    store = TokenStore(tokens_file)
    if tokens_file.exists() or tokens_file.is_symlink():
        from volseg.server.tokens import _check_private, parse_tokens

        _check_private(tokens_file)
        if parse_tokens(tokens_file.read_text(encoding="utf-8"), tokens_file):
            return store, None
    return store, add_token(tokens_file, "default")


def run_server(args) -> int:
    """``volseg server``: check everything, start the device workers, then serve until stopped."""
    try:
        import uvicorn
    except ImportError:
        raise VolSegError("volseg server needs FastAPI and uvicorn", hint='pip install "volseg[server]"') from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not Path(path).is_file():
            raise InputError(f"TLS file {path} does not exist")
    warning = check_address(args.host, bool(args.tls_cert), args.insecure_http)
    state = private_folder(Path(args.state_dir) if args.state_dir else default_state_dir())
    tokens_file = Path(args.tokens_file) if args.tokens_file else state / "tokens"
    if args.add_token:
        token = add_token(tokens_file, args.add_token)
        print(f"token {args.add_token!r} added to {tokens_file}:\n{token}")
        return 0
    tokens, first = prepare_tokens(tokens_file)
    for folder in args.models_dir:
        if not Path(folder).is_dir():
            raise InputError(f"--models-dir {folder} is not a folder")
    limits = ServerLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_voxels=args.max_voxels,
                          jobs_per_token=args.jobs_per_token, job_time_s=args.job_time, queue_length=args.queue_length,
                          keep_s=args.keep)

    from volseg.server.app import CardIndex, build_app
    from volseg.server.jobs import JobBoard

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    host_name = args.name or socket.gethostname()
    board = JobBoard(state, limits, args.device or ["auto"], [Path(d) for d in args.models_dir], host_name)
    cards = CardIndex(args.models_dir)
    cards.cards()
    app = build_app(board, tokens, cards)
    board.start()
    scheme = "https" if args.tls_cert else "http"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if warning:
        print(warning, file=sys.stderr)
    print(f"volseg server listening on {scheme}://{shown}:{port} (devices: {', '.join(args.device or ['auto'])})")
    print(f"tokens: {tokens_file} (mode 0600; delete a line to revoke that token)")
    if first:
        print(f"first start: made the token 'default' (shown once, also kept in the file above):\n{first}")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key, timeout_keep_alive=30, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        board.close()
    return 0
