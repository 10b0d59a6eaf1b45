"""Run on: a volseg server (pure Python, no Slicer, no Qt).

The panel's "Run on" is ``computer`` (the engine runs here) or ``server``: the engine still runs
here as a background process, but as ``volseg segment ... --server URL``, which uploads the
volumes, relays the server's progress events and writes the result where a local run would, so
progress, Cancel (the server's job is cancelled too) and the import are the same. The server
runs its own model cards with their own weights and picks its device: the panel's checkpoint
and device choices are for runs on this computer (the panel greys them out).

The token lives only in the application settings (never in the scene, the parameter node or a
log line): it reaches the engine process in its environment (``VOLSEG_SERVER_TOKEN``), never on
its command line (which is logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

RUN_ON_CHOICES = ("computer", "server")
TOKEN_ENV = "VOLSEG_SERVER_TOKEN"
SETTINGS_KEYS = {"url": "Server/URL", "token": "Server/Token", "caCert": "Server/CACertificate"}


@dataclass
class ServerTarget:
    """A volseg server: its URL, the token (kept out of ``repr``) and an optional CA certificate."""

    url: str
    token: str = field(default="", repr=False)
    caCert: str = ""

    def check(self) -> None:
        """Raise ValueError with a message for the panel when the server settings are incomplete."""
        if not self.url.startswith(("https://", "http://")):
            raise ValueError("Give the server's address, e.g. https://gpu-box:8443.")
        if not self.token.strip():
            raise ValueError("Give the server's token (the server's administrator has it).")

    def arguments(self) -> list[str]:
        """The engine arguments that send a run (or a model query) to this server."""
        return ["--server", self.url] + (["--ca-cert", self.caCert] if self.caCert else [])

    def environment(self) -> dict[str, str]:
        return {TOKEN_ENV: self.token.strip()}


def load_server_target(value: Callable[[str, Any], Any]) -> ServerTarget:
    """The server remembered in the application settings (``value(key, default)``)."""
    return ServerTarget(url=str(value(SETTINGS_KEYS["url"], "") or ""), token=str(value(SETTINGS_KEYS["token"], "") or ""),
                        caCert=str(value(SETTINGS_KEYS["caCert"], "") or ""))


def save_server_target(set_value: Callable[[str, Any], None], target: ServerTarget) -> None:
    """Remember the server in the application settings (not in the scene)."""
    set_value(SETTINGS_KEYS["url"], target.url)
    set_value(SETTINGS_KEYS["token"], target.token)
    set_value(SETTINGS_KEYS["caCert"], target.caCert)
