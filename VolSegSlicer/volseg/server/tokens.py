"""Named bearer tokens, kept in a file only its owner can read (mode 0600).

The file holds one token per line, ``NAME TOKEN`` (``#`` starts a comment). It is re-read when
it changes, so deleting a line revokes that token without a restart. Tokens are compared in
constant time (:func:`hmac.compare_digest`) against every entry, so the time taken does not say
which token, or how much of one, was right.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import stat
import threading
from pathlib import Path

from volseg.errors import InputError

TOKEN_BYTES = 32  # 256 bits
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,256}$")
MAX_TOKENS_FILE = 1 << 20


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def _check_private(path: Path) -> os.stat_result:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"the tokens file {path} is not a regular file", hint="give a plain file (no symlink)")
    if os.name != "nt" and info.st_mode & 0o077:
        raise InputError(f"the tokens file {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o})",
                         hint=f"chmod 600 {path}")
    return info


def parse_tokens(text: str, path: Path) -> dict[str, str]:
    """``{name: token}`` from the file's text; a malformed line is an error naming its number."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.match(parts[0]) or not _TOKEN.match(parts[1]):
            raise InputError(f"{path} line {number} is not 'NAME TOKEN' (token: 32+ URL-safe characters)")
        if parts[0] in tokens:
            raise InputError(f"{path} line {number}: the name {parts[0]!r} is used twice")
        tokens[parts[0]] = parts[1]
    return tokens


def add_token(path: Path, name: str) -> str:
    """Append a new token named ``name`` to the file (created 0600 if missing); returns the token."""
    if not _NAME.match(name):
        raise InputError(f"token name {name!r} is not allowed", hint="use letters, digits, _ . @ - (at most 64)")
    path = Path(path)
    existing = TokenStore(path).tokens() if path.exists() else {}
    if name in existing:
        raise InputError(f"there is already a token named {name!r} in {path}",
                         hint="remove its line to revoke it, or choose another name")
    token = new_token()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{name} {token}\n")
    return token


class TokenStore:
    """The tokens file, re-read whenever its size, time or inode change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._tokens: dict[str, str] = {}

    def tokens(self) -> dict[str, str]:
        """The current ``{name: token}``; an unreadable or unsafe file allows nobody."""
        with self._lock:
            try:
                info = _check_private(self.path)
                stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
                if stamp != self._stamp:
                    if info.st_size > MAX_TOKENS_FILE:
                        raise InputError(f"the tokens file {self.path} is larger than 1 MB")
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    with os.fdopen(fd, encoding="utf-8") as f:
                        self._tokens = parse_tokens(f.read(MAX_TOKENS_FILE), self.path)
                    self._stamp = stamp
            except (OSError, InputError, UnicodeDecodeError):
                self._tokens, self._stamp = {}, None
            return dict(self._tokens)

    def who(self, given: str | None) -> str | None:
        """The name of the token ``given``, or None. Every entry is compared, in constant time."""
        if not given:
            return None
        found = None
        given_bytes = given.encode("utf-8", "replace")
        for name, token in self.tokens().items():
            if hmac.compare_digest(given_bytes, token.encode()):
                found = name
        return found
