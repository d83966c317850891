"""Short-lived JWT access tokens (RFC 9068 shape), signed with Ed25519 (``EdDSA``).

Keys are PEM files (PKCS#8, mode 0600) in one directory, ``<kid>.pem``, where the key id
is the first 16 hex digits of SHA-256 over the raw 32-byte public key. The newest file
(by modification time, then name) signs. :meth:`AccessTokens.rotate` adds a newer one.

Rotation without breaking tokens in flight: the JWKS publishes the signing key and every
older key whose *successor* was created less than ``ttl + 5 minutes`` ago, so a token
signed just before a rotation still verifies until it expires (with room for clock skew
and JWKS caching). Keys past that are moved to ``retired/`` (never deleted: an
investigator may still want to check an old token).

Several processes may serve at once (``serve --workers N``, and the CLI rotating keys):
each re-reads the directory when its modification time changes, so a rotation made by
one process is used by all of them on their next request.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from echo_auth.identity.errors import DomainError
from echo_auth.identity.sessions import CurrentSession

ALGORITHM: Final = "EdDSA"
# Published past the end of their signing life: the token TTL plus this margin.
OVERLAP_MARGIN: Final = timedelta(minutes=5)
RETIRED_DIR: Final = "retired"
RELOAD_S: Final = 10.0
# Claims every Echo access token carries; verification refuses a token without one.
REQUIRED_CLAIMS: Final = ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid"]


class JwtKeyError(Exception):
    """A JWT signing key cannot be read or created."""


class InvalidAccessToken(DomainError):
    """The access token is malformed, expired, not for us, or not signed by our keys."""

    code = "invalid_access_token"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """The RFC 8037 JWK of an Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": ALGORITHM}


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey
    created: float  # file modification time, seconds since the epoch
    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True)
class MintedToken:
    token: str
    expires_in: int
    jti: str
    kid: str
    expires_at: int


def _read_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise JwtKeyError(f"cannot read the JWT key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise JwtKeyError(f"{path} is not an Ed25519 private key")
    return key


def write_new_key(directory: Path) -> SigningKey:
    """Generate a key and store it as ``<kid>.pem`` (mode 0600), never overwriting a file.

    Written to a hidden temporary name first and renamed into place, so a reader in
    another process never sees half a key.
    """
    key = Ed25519PrivateKey.generate()
    kid = key_id_of(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = directory / f"{kid}.pem"
    partial = directory / f".{kid}.{os.getpid()}.tmp"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(partial, final)  # fails if the name exists: never overwrite a key
    except OSError as exc:
        raise JwtKeyError(f"cannot create a JWT key in {directory}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return SigningKey(kid, key, final.stat().st_mtime, final)


class AccessTokens:
    """Mints and verifies Echo's access tokens; owns the JWT key directory."""

    def __init__(
        self, key_dir: Path, *, issuer: str, audience: str, ttl: timedelta, leeway_s: int = 0
    ) -> None:
        self.key_dir = key_dir
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway_s = leeway_s
        self._lock = threading.Lock()
        self._loaded_stamp: int | None = None
        self._loaded_at = 0.0
        self._keys: list[SigningKey] = []  # oldest first

    # -- keys -------------------------------------------------------------------------

    @property
    def overlap(self) -> timedelta:
        return self.ttl + OVERLAP_MARGIN

    def _stamp(self) -> int | None:
        try:
            return self.key_dir.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _load(self) -> list[SigningKey]:
        keys: list[SigningKey] = []
        for path in self.key_dir.glob("*.pem"):
            try:
                created = path.stat().st_mtime
            except FileNotFoundError:  # retired by another process meanwhile
                continue
            private_key = _read_key(path)
            keys.append(SigningKey(key_id_of(private_key.public_key()), private_key, created, path))
        keys.sort(key=lambda k: (k.created, k.kid))
        return keys

    def live_keys(self) -> list[SigningKey]:
        """The live keys, oldest first (the last one signs); creates the first on demand.

        Retires (moves aside) keys that no token in flight can still need.
        """
        with self._lock:
            stamp = self._stamp()
            now = time.monotonic()
            # A changed directory means another process rotated or retired a key. The
            # periodic re-read covers two changes within one tick of the file system clock.
            if stamp is None or stamp != self._loaded_stamp or now - self._loaded_at > RELOAD_S:
                keys = self._load()
                if not keys:
                    keys = [write_new_key(self.key_dir)]
                self._keys = keys
                # The stamp from before the read: our own changes below cause one re-read.
                self._loaded_stamp = stamp
                self._loaded_at = now
            self._keys = self._retire_expired(self._keys)
            return list(self._keys)

    def _retire_expired(self, keys: list[SigningKey]) -> list[SigningKey]:
        cutoff = time.time() - self.overlap.total_seconds()
        live: list[SigningKey] = []
        for key, successor in zip(keys, [*keys[1:], None], strict=True):
            if successor is not None and successor.created < cutoff:
                self._move_aside(key)
            else:
                live.append(key)
        return live

    def _move_aside(self, key: SigningKey) -> None:
        retired = self.key_dir / RETIRED_DIR
        retired.mkdir(exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            key.path.rename(retired / key.path.name)

    @property
    def signing_key(self) -> SigningKey:
        return self.live_keys()[-1]

    def rotate(self) -> SigningKey:
        """Make a new signing key; the previous ones stay published for ``ttl + 5 min``."""
        with self._lock:
            previous = self._load()
            new = write_new_key(self.key_dir)
            # A key made within the same clock tick as the previous newest must still sort
            # after it: modification times are the order.
            if previous and new.created <= previous[-1].created:
                bumped = previous[-1].created + 0.001
                os.utime(new.path, (bumped, bumped))
                new = SigningKey(new.kid, new.private_key, new.path.stat().st_mtime, new.path)
            self._loaded_stamp = None
        self.live_keys()  # reload, retiring what is now past its overlap
        return new

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JSON Web Key Set served at ``/.well-known/jwks.json``."""
        return {"keys": [public_jwk(k.public_key, k.kid) for k in reversed(self.live_keys())]}

    # -- tokens -----------------------------------------------------------------------

    def mint(self, session: CurrentSession) -> MintedToken:
        """Sign an access token for a live session (the caller records ``token.issued``)."""
        key = self.signing_key
        now = int(time.time())
        ttl = int(self.ttl.total_seconds())
        jti = str(uuid.uuid4())
        user = session.user
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user.id,
            "aud": self.audience,
            "exp": now + ttl,
            "iat": now,
            "nbf": now,
            "jti": jti,
            "sid": session.id,
            "roles": list(user.roles),
            "email": user.email,
        }
        token = jwt.encode(
            claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "at+jwt"}
        )
        return MintedToken(token, ttl, jti, key.kid, now + ttl)

    def issue(self, session: CurrentSession) -> tuple[str, int]:
        """``(token, expires_in)`` for a live session."""
        minted = self.mint(session)
        return minted.token, minted.expires_in

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """The claims of a valid Echo access token; raises :class:`InvalidAccessToken`.

        Checks exactly what a relying service checks with the published JWKS: the
        algorithm is pinned to EdDSA (no ``none``, no HMAC with a public key), the ``kid``
        must be one of the published keys, and signature, ``exp``/``nbf``/``iat``,
        issuer and audience must hold.
        """
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            jwk = next((k for k in self.jwks()["keys"] if k["kid"] == kid), None)
            if jwk is None:
                raise InvalidAccessToken("the token's key is unknown or retired")
            return jwt.decode(
                token,
                jwt.PyJWK(dict(jwk), algorithm=ALGORITHM),
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise InvalidAccessToken(f"invalid access token: {exc}") from None
