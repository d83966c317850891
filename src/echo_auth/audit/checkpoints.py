"""Signed checkpoints of the chain head, kept in the audit database AND outside it.

A checkpoint is a statement, canonical JSON (sorted keys, no whitespace, UTF-8)::

    {"format": "echo-checkpoint/1", "origin": "...", "seq": 1234,
     "hash": "<hex chain hash at seq>", "signed_at": "2026-11-27T17:30:00.000000Z",
     "key_id": "<first 32 hex of SHA-256 of the raw public key>"}

signed with Ed25519. The sink writes two files per checkpoint, never overwritten and made
read-only: ``<seq:012d>-<signed_at>.json`` (the exact signed bytes) and the same name
with ``.sig`` (the raw 64-byte signature), so that anyone can check one with OpenSSL::

    openssl pkeyutl -verify -pubin -inkey checkpoint-key.pem -rawin \\
        -in 000000001234-20261127T173000Z.json -sigfile 000000001234-20261127T173000Z.sig

An attacker who rewrites the database, hashes included, cannot rewrite these files
without the private key, so verification compares every external checkpoint with the
chain and catches a rewritten history or a cut-off tail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, insert, select

from echo_auth.audit.events import canonical_json, format_timestamp, parse_timestamp
from echo_auth.db.audit_schema import chain_head, checkpoints
from echo_auth.db.engines import transaction

FORMAT = "echo-checkpoint/1"


class CheckpointKeyError(Exception):
    """The checkpoint key cannot be read or created."""


# -- keys ---------------------------------------------------------------------------------


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_or_create_key(path: Path, *, create: bool = True) -> Ed25519PrivateKey:
    """Read the PEM private key at ``path``; create it (mode 0600) if absent and allowed."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise CheckpointKeyError(f"cannot read the checkpoint key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CheckpointKeyError(f"{path} is not an Ed25519 private key")
        return key
    if not create:
        raise CheckpointKeyError(f"no checkpoint key at {path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        write_new_file(path, pem, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return load_or_create_key(path, create=False)
    # The public half beside it: verification needs only this file, never the private key.
    with contextlib.suppress(FileExistsError):
        write_new_file(public_path(path), public_key_pem(key.public_key()).encode(), 0o644)
    return key


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data``, all or nothing, never replacing an existing file.

    Written to a temporary name and fsynced, then hard-linked into place (link fails if
    the name exists), so a crash leaves either no file or the whole file, never a stub.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise CheckpointKeyError(f"cannot read the checkpoint public key {path}: {exc}") from None


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointKeyError("not an Ed25519 public key")
    return key


# -- the statement ------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    signed_at: datetime
    key_id: str
    statement: bytes
    signature: bytes

    @property
    def file_stem(self) -> str:
        return f"{self.seq:012d}-{self.signed_at:%Y%m%dT%H%M%S%fZ}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "signed_at": format_timestamp(self.signed_at),
            "key_id": self.key_id,
        }


def sign_checkpoint(
    key: Ed25519PrivateKey, origin: str, seq: int, head_hash: str, signed_at: datetime
) -> Checkpoint:
    key_id = key_id_of(key.public_key())
    statement = canonical_json(
        {
            "format": FORMAT,
            "origin": origin,
            "seq": seq,
            "hash": head_hash,
            "signed_at": format_timestamp(signed_at),
            "key_id": key_id,
        }
    ).encode("utf-8")
    return Checkpoint(seq, head_hash, signed_at, key_id, statement, key.sign(statement))


class BadCheckpoint(ValueError):
    """A checkpoint whose signature or statement does not hold."""


def open_checkpoint(statement: bytes, signature: bytes, public_key: Ed25519PublicKey) -> Checkpoint:
    """Check a signature and parse its statement; raises :class:`BadCheckpoint`."""
    try:
        public_key.verify(signature, statement)
    except InvalidSignature:
        raise BadCheckpoint("signature does not verify") from None
    try:
        doc = json.loads(statement)
        if doc.get("format") != FORMAT:
            raise BadCheckpoint(f"unknown format {doc.get('format')!r}")
        return Checkpoint(
            int(doc["seq"]),
            str(doc["hash"]),
            parse_timestamp(doc["signed_at"]),
            str(doc["key_id"]),
            statement,
            signature,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BadCheckpoint(f"statement is malformed: {exc}") from None


# -- sinks outside the database ----------------------------------------------------------


class CheckpointSink(Protocol):
    """Append-only storage for checkpoints outside the audit database."""

    def write(self, checkpoint: Checkpoint) -> None: ...

    def read_all(self) -> Iterator[tuple[str, bytes, bytes | None]]:
        """Every stored checkpoint as (name, statement bytes, signature bytes or None)."""
        ...


class DirectorySink:
    """One pair of read-only files per checkpoint in a directory; never overwrites."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, checkpoint: Checkpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = checkpoint.file_stem
        # Signature first: a statement file never exists without its signature.
        write_new_file(self.directory / f"{stem}.sig", checkpoint.signature, 0o444)
        write_new_file(self.directory / f"{stem}.json", checkpoint.statement, 0o444)

    def read_all(self) -> Iterator[tuple[str, bytes, bytes | None]]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            sig_path = path.with_suffix(".sig")
            signature = sig_path.read_bytes() if sig_path.exists() else None
            yield path.name, path.read_bytes(), signature


# -- making checkpoints -------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to sign: after ``every_events`` new events; after ``every`` if any event came;
    and after ``idle_every`` even when none did (so a cut-off tail shows up even in a
    quiet log, without writing files every minute for nothing)."""

    every_events: int = 1000
    every: timedelta = timedelta(seconds=60)
    idle_every: timedelta = timedelta(hours=1)


@dataclass
class Checkpointer:
    """Signs the chain head when due and stores the checkpoint in both places."""

    audit: Engine
    key: Ed25519PrivateKey
    sink: CheckpointSink
    origin: str
    policy: CheckpointPolicy

    def maybe_checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the head if N events or T seconds passed since the last checkpoint.

        The head is locked while deciding, so concurrent relays do not sign twice. The
        database row commits first; the files follow. A crash in between leaves a row
        without files, which verification reports (it cannot tell that from deletion).
        """
        now = datetime.now(UTC)
        with transaction(self.audit) as conn:
            head_seq, head_hash, moved_to = conn.execute(
                select(chain_head.c.seq, chain_head.c.hash, chain_head.c.moved_to)
                .where(chain_head.c.id == 1)
                .with_for_update()
            ).one()
            if moved_to is not None:
                return None  # moved to another server: checkpoints are signed there now
            if not force and not self._due(conn, int(head_seq), now):
                return None
            checkpoint = sign_checkpoint(self.key, self.origin, int(head_seq), head_hash, now)
            conn.execute(
                insert(checkpoints).values(
                    seq=checkpoint.seq,
                    hash=checkpoint.hash,
                    signed_at=checkpoint.signed_at,
                    key_id=checkpoint.key_id,
                    statement=checkpoint.statement.decode("utf-8"),
                    signature=base64.b64encode(checkpoint.signature).decode("ascii"),
                )
            )
        self.sink.write(checkpoint)
        return checkpoint

    def _due(self, conn: Connection, head_seq: int, now: datetime) -> bool:
        last = conn.execute(
            select(checkpoints.c.seq, checkpoints.c.signed_at)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        ).first()
        if last is None:
            return True
        new_events = head_seq - int(last.seq)
        age = now - last.signed_at
        return (
            new_events >= self.policy.every_events
            or (new_events > 0 and age >= self.policy.every)
            or age >= self.policy.idle_every
        )


def stored_checkpoints(conn: Connection) -> list[tuple[int, bytes, bytes]]:
    """The database copies: (row id, statement, signature)."""
    rows = conn.execute(
        select(checkpoints.c.id, checkpoints.c.statement, checkpoints.c.signature).order_by(
            checkpoints.c.id
        )
    ).all()
    out: list[tuple[int, bytes, bytes]] = []
    for row in rows:
        try:
            signature = base64.b64decode(row.signature, validate=True)
        except ValueError:
            signature = b""
        out.append((int(row.id), row.statement.encode("utf-8"), signature))
    return out
