"""Opaque secrets handed to users (session tokens, one-time links), stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets


def new_token() -> str:
    """256 bits from the OS's CSPRNG, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the database keeps: SHA-256 of the token (hex). A high-entropy token needs no salt.

    The lookup is by this hash through a unique index, so no secret is ever compared
    character by character in Python.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
