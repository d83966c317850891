"""Backups of both databases: create and list (verify and restore: ``backup_restore``).

Consistency between the two databases. The identity database is dumped first, the audit
database second. Every event whose identity change is in the identity dump is then in
the backup: either it was still in the outbox (which lives in the identity database, so
it is in the identity dump and the relay delivers it after a restore), or the relay had
already delivered it, before the identity snapshot and so before the later audit one.
An event delivered between the two snapshots is in both; the relay's append is
idempotent on ``event_id``, so after a restore it is removed from the outbox, not
appended twice. The other order could lose events: delivered (and deleted from the
outbox) after an audit snapshot but before the identity one. The manifest records the
chain head seen just after the identity dump and the head inside the audit dump; the
second is never behind the first.

The external checkpoint files (what ``audit verify`` checks the chain against) are
copied into the archive. A checkpoint signed after the audit snapshot would look like
a cut-off tail in the restored copy, so files whose statement is not in the dumped
``checkpoints`` table and that were signed after the dump began (less a margin for
in-flight transactions) are left out; older ones always go in, whatever they say.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from echo_auth.audit.chain import read_head
from echo_auth.audit.events import format_timestamp
from echo_auth.config import Settings
from echo_auth.db import migrate
from echo_auth.db.audit_schema import checkpoints
from echo_auth.db.engines import normalize_url, transaction
from echo_auth.ops.backup_format import (
    CHECKPOINTS,
    FORMAT,
    ArchiveInfo,
    Backend,
    BackupError,
    CorruptArchive,
    DumpResult,
    ProgressFactory,
    TargetNotEmpty,
    apply_retention,
    archive_name,
    encrypt_to,
    list_archives,
    no_progress,
    parse_recipients,
    read_manifest_only,
    sha256_file,
    write_archive,
)
from echo_auth.ops.backup_mysql import MySQLBackend
from echo_auth.ops.backup_sqlite import SQLiteBackend

__all__ = [
    "ArchiveInfo",
    "BackupError",
    "CorruptArchive",
    "TargetNotEmpty",
    "create_backup",
    "list_backups",
]

DATABASES: tuple[migrate.Database, ...] = ("identity", "audit")
BACKENDS: dict[str, Backend] = {"sqlite": SQLiteBackend(), "mysql": MySQLBackend()}
# How long a checkpoint transaction may have been in flight when the audit dump began.
CHECKPOINT_MARGIN = timedelta(minutes=2)


def backend_for(url: str) -> Backend:
    return BACKENDS[normalize_url(url).get_backend_name()]


def database_url(settings: Settings, which: str) -> str:
    return settings.identity_db_url if which == "identity" else settings.audit_db_url


def _echo_version() -> str:
    try:
        return metadata.version("echo-auth")
    except metadata.PackageNotFoundError:
        return "unknown"


def _head_dict(head: tuple[int, str]) -> dict[str, Any]:
    return {"seq": head[0], "hash": head[1]}


# -- create -------------------------------------------------------------------------------


@dataclass
class CreatedBackup:
    path: Path
    size: int
    sha256: str
    manifest: dict[str, Any]
    deleted: list[str]

    @property
    def audit_head(self) -> tuple[int, str]:
        head = self.manifest["audit_head"]
        return int(head["seq"]), str(head["hash"])


def create_backup(
    settings: Settings,
    audit: Engine,
    *,
    directory: Path,
    recipients: Sequence[str] = (),
    keep: int | None = None,
    progress: ProgressFactory = no_progress,
) -> CreatedBackup:
    """Dump both databases, pack them with the checkpoints and a manifest, apply retention.

    ``audit`` is the live audit database (to read its head and checkpoint rows).
    """
    age_recipients = parse_recipients(recipients)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    backends: dict[str, Backend] = {w: backend_for(database_url(settings, w)) for w in DATABASES}
    with tempfile.TemporaryDirectory(prefix="echo-backup-") as tmp:
        work = Path(tmp)
        identity = backends["identity"].dump(
            settings.identity_db_url,
            work / f"identity{backends['identity'].suffix}",
            label="identity",
            progress=progress,
        )
        with transaction(audit, write=False) as conn:
            head_after_identity = read_head(conn)
        audit_started = datetime.now(UTC)
        dumped = backends["audit"].dump(
            settings.audit_db_url,
            work / f"audit{backends['audit'].suffix}",
            label="audit",
            progress=progress,
        )
        if dumped.head is None:
            raise BackupError("the audit database has no chain head: run `echo-auth db upgrade`")
        if dumped.head[0] < head_after_identity[0]:
            raise BackupError(
                f"the audit chain went back from seq {head_after_identity[0]} to "
                f"{dumped.head[0]} during the backup; run `echo-auth audit verify`"
            )
        statements = _dumped_checkpoints(audit, dumped.tables.get("checkpoints", 0))
        chosen, left_out = _select_checkpoints(
            settings.checkpoint_dir, statements, audit_started - CHECKPOINT_MARGIN
        )
        members = [(f"identity{identity.file.suffix}", identity.file)]
        members.append((f"audit{dumped.file.suffix}", dumped.file))
        members += [(f"{CHECKPOINTS}/{path.name}", path) for path in chosen]
        created_at = datetime.now(UTC)
        manifest = _manifest(
            created_at, backends, identity, dumped, head_after_identity, members, left_out
        )
        manifest["checkpoints"]["directory"] = str(settings.checkpoint_dir)
        name, created_at = _free_name(directory, created_at, encrypted=bool(age_recipients))
        manifest["created_at"] = format_timestamp(created_at)
        final = directory / name
        partial = directory / f".{name}.partial"
        try:
            if age_recipients:
                plain = work / "archive.tar.gz"
                write_archive(plain, manifest, members, progress=progress)
                with progress("encrypting", None) as advance:
                    encrypt_to(plain, partial, age_recipients)
                    advance(1)
            else:
                write_archive(partial, manifest, members, progress=progress)
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
    _fsync_dir(directory)
    deleted = apply_retention(directory, settings.backup_keep if keep is None else keep)
    return CreatedBackup(final, final.stat().st_size, sha256_file(final), manifest, deleted)


def _free_name(directory: Path, moment: datetime, *, encrypted: bool) -> tuple[str, datetime]:
    """The archive's name; two backups in one second: the second waits for the next."""
    for _ in range(3):
        names = {archive_name(moment, encrypted=flag) for flag in (True, False)}
        if not any((directory / n).exists() for n in names):
            return archive_name(moment, encrypted=encrypted), moment
        time.sleep(1.0 - moment.microsecond / 1e6)
        moment = datetime.now(UTC)
    raise BackupError(f"{archive_name(moment, encrypted=encrypted)} already exists")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumped_checkpoints(audit: Engine, count: int) -> set[bytes]:
    """The statements of the first ``count`` checkpoint rows: those the dump holds.

    Checkpoints are inserted while the chain head is locked, so ids follow commit order
    and the rows a snapshot saw are exactly the first ones by id.
    """
    if count <= 0:
        return set()
    with transaction(audit, write=False) as conn:
        rows = conn.execute(
            select(checkpoints.c.statement).order_by(checkpoints.c.id).limit(count)
        ).scalars()
        return {str(statement).encode("utf-8") for statement in rows}


def _select_checkpoints(
    directory: Path | None, dumped: set[bytes], signed_after: datetime
) -> tuple[list[Path], int]:
    """The checkpoint files to archive, and how many were left out as newer than the dump."""
    if directory is None or not directory.is_dir():
        return [], 0
    for _ in range(20):  # files follow their row's commit by moments: wait for them briefly
        on_disk = {p.read_bytes() for p in directory.glob("*.json")}
        if dumped <= on_disk:
            break
        time.sleep(0.1)
    chosen: list[Path] = []
    left_out = 0
    for path in sorted(directory.glob("*.json")):
        statement = path.read_bytes()
        if statement not in dumped and _signed_at(statement) >= signed_after:
            left_out += 1
            continue
        chosen.append(path)
        signature = path.with_suffix(".sig")
        if signature.exists():
            chosen.append(signature)
    return chosen, left_out


def _signed_at(statement: bytes) -> datetime:
    try:
        return datetime.strptime(
            json.loads(statement)["signed_at"], "%Y-%m-%dT%H:%M:%S.%fZ"
        ).replace(tzinfo=UTC)
    except (ValueError, KeyError, TypeError):
        return datetime.min.replace(tzinfo=UTC)  # unreadable: archive it, verify will say why


def _manifest(
    created_at: datetime,
    backends: Mapping[str, Backend],
    identity: DumpResult,
    audit: DumpResult,
    head_after_identity: tuple[int, str],
    members: list[tuple[str, Path]],
    left_out: int,
) -> dict[str, Any]:
    assert audit.head is not None
    databases: dict[str, Any] = {}
    for which, dump in (("identity", identity), ("audit", audit)):
        databases[which] = {
            "backend": backends[which].name,
            "file": f"{which}{dump.file.suffix}",
            "revision": dump.revision,
            "tables": dict(sorted(dump.tables.items())),
            **dump.details,
        }
    databases["audit"]["head"] = _head_dict(audit.head)
    tools = {"python": platform.python_version(), "pyrage": _package_version("pyrage")}
    for backend in {b.name: b for b in backends.values()}.values():
        tools.update(backend.tool_versions())
    return {
        "format": FORMAT,
        "created_at": format_timestamp(created_at),
        "echo_version": _echo_version(),
        "databases": databases,
        "audit_head": _head_dict(audit.head),
        "audit_head_after_identity_dump": _head_dict(head_after_identity),
        "checkpoints": {
            "files": sum(1 for name, _ in members if name.endswith(".json")),
            "left_out_as_newer": left_out,
        },
        "files": {
            name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for name, path in members
        },
        "tools": tools,
    }


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


# -- list ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedBackup:
    info: ArchiveInfo
    manifest: dict[str, Any] | None


def list_backups(directory: Path, *, read_manifests: bool = True) -> list[ListedBackup]:
    return [
        ListedBackup(info, read_manifest_only(info.path) if read_manifests else None)
        for info in list_archives(directory)
    ]
