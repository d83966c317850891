"""CSRF protection of the HTML forms: signed double-submit tokens bound to the session.

The scheme (OWASP's "signed double-submit cookie"):

* Every browser gets a random nonce in the ``echo_csrf`` cookie (HttpOnly, SameSite=Lax,
  Secure when the base URL is https) the first time a page is rendered for it.
* Every form carries ``csrf_token = base64url(HMAC-SHA256(key, "csrf|" + nonce + "|" +
  session_id))``, where ``session_id`` is the id of the signed-in session ("" when nobody
  is signed in). The key is 32 random bytes in ``$ECHO_DATA_DIR/keys/csrf-hmac.key``,
  created on first use with mode 0600 (all or nothing, never replaced; several workers
  starting together end up with the same file).
* A POST is accepted only when the cookie is present and the field equals the HMAC
  recomputed for that cookie and the session the request presents (constant-time
  comparison). Anything else is refused with 403 before the form is looked at, and the
  refusal is recorded as ``access.denied`` (reason ``csrf``).

Why this shape: a cross-site form can neither read the token (it is in our HTML, which the
CSP, X-Frame-Options and CORS keep to our origin) nor compute one (it needs the key); a
token is useless without its nonce cookie, and after sign-in useless outside its session,
so a token leaked from one browser or one session does not work for another. Nothing is
stored server side. Signing in rotates the nonce.

The same key signs the one-shot flash messages (``echo_flash``), under another label.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets
import threading
from pathlib import Path
from typing import Final

from echo_auth.audit.checkpoints import write_new_file

CSRF_COOKIE: Final = "echo_csrf"
CSRF_FIELD: Final = "csrf_token"
KEY_FILE_NAME: Final = "csrf-hmac.key"
KEY_BYTES: Final = 32
_MAX_NONCE: Final = 64


class CsrfKeyError(RuntimeError):
    """The CSRF key file exists but cannot be used."""


def load_or_create_key(path: Path) -> bytes:
    """The key at ``path``; created (32 random bytes, mode 0600) when absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Another worker may write it first: then its key is the one used.
        with contextlib.suppress(FileExistsError):
            write_new_file(path, secrets.token_bytes(KEY_BYTES), 0o600)
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise CsrfKeyError(f"{path} holds {len(key)} bytes; at least {KEY_BYTES} are needed")
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


class CsrfSigner:
    """Issues and checks form tokens and signs flash messages with one server key."""

    def __init__(self, key_path: Path) -> None:
        self._path = key_path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    @property
    def key(self) -> bytes:
        # Read on first use, not when the app is built: the CLI and tests that never render a
        # page need no key file.
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = load_or_create_key(self._path)
        return self._key

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def usable_nonce(nonce: str | None) -> bool:
        return bool(nonce) and len(nonce or "") <= _MAX_NONCE

    def _mac(self, label: str, message: str) -> str:
        digest = hmac.new(self.key, f"{label}|{message}".encode(), hashlib.sha256).digest()
        return _b64(digest)

    def token(self, nonce: str, session_id: str | None) -> str:
        """The form token for this browser's nonce and (when signed in) session."""
        return self._mac("csrf", f"{nonce}|{session_id or ''}")

    def check(self, nonce: str | None, session_id: str | None, presented: str | None) -> bool:
        if not self.usable_nonce(nonce) or not presented or len(presented) > 128:
            return False
        assert nonce is not None
        return hmac.compare_digest(self.token(nonce, session_id), presented)

    def sign_flash(self, kind: str, text: str) -> str:
        body = _b64(f"{kind}\n{text}".encode())
        return f"{body}.{self._mac('flash', body)}"

    def open_flash(self, value: str | None) -> tuple[str, str] | None:
        """The (kind, text) of a flash cookie this server signed, or None."""
        if not value or len(value) > 2048 or "." not in value:
            return None
        body, _, mac = value.partition(".")
        if not hmac.compare_digest(self._mac("flash", body), mac):
            return None
        try:
            decoded = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        kind, _, text = decoded.partition("\n")
        return kind, text
