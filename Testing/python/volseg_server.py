"""A real ``volseg server`` in a subprocess on 127.0.0.1 for the tests (and a self-signed certificate)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "VolSegSlicer"


def engine_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(MODULE_DIR), OMP_NUM_THREADS="1", **extra)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM), made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "volseg test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class ServerProcess:
    """``volseg server`` started in its own process group; ``url``, ``token`` (the first one), ``state``."""

    def __init__(self, state: Path, *args: str, port: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        self.state, self.args, self.tls = Path(state), list(args), tls
        argv = [sys.executable, "-m", "volseg", "server", "--host", "127.0.0.1", "--port", str(port),
                "--state-dir", str(state), "--name", "test-box", *args]
        if tls:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.log = open(self.state.parent / f"{self.state.name}-server.log", "a+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True, env=engine_env(),
                                     start_new_session=True)
        self.url = ""
        end = time.monotonic() + 60
        for line in self.proc.stdout:  # bounded: the server prints its address within seconds
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.url = found.group(1)
                break
            if time.monotonic() > end:
                break
        if not self.url:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {self.log.read()[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.token = (self.state / "tokens").read_text().split()[1]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
