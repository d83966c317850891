"""Verify a backup (a full restore into scratch databases) and restore one for real.

Both run the same checks on what they restored: every member's SHA-256 against the
manifest (before any database is touched), row counts per table equal to the manifest,
migrations at head (older backups are upgraded, as a restore would), and ``audit verify``
clean against the checkpoint files inside the archive, with the checkpoint public key of
the running installation: a key taken from the archive itself would prove nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, func, inspect, select, table
from sqlalchemy.engine import make_url

from echo_auth.audit.chain import read_head
from echo_auth.audit.checkpoints import DirectorySink
from echo_auth.audit.verify import count_events, verify_audit_log
from echo_auth.config import Settings
from echo_auth.db import migrate
from echo_auth.db.engines import make_engine, transaction
from echo_auth.ops.backup import BACKENDS, DATABASES, backend_for, database_url
from echo_auth.ops.backup_format import (
    BackupError,
    CorruptArchive,
    OpenedArchive,
    ProgressFactory,
    TargetNotEmpty,
    load_identities,
    no_progress,
    open_archive,
)
from echo_auth.ops.backup_mysql import scratch_name


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    archive: Path
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "archive": str(self.archive),
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": self.notes,
        }


def _open(
    path: Path, work: Path, identity_file: Path | None, progress: ProgressFactory
) -> OpenedArchive:
    identities = load_identities(identity_file) if identity_file is not None else None
    opened = open_archive(path, work, identities=identities, progress=progress)
    manifest = opened.manifest
    for which in DATABASES:
        db = manifest.get("databases", {}).get(which)
        if (
            not isinstance(db, dict)
            or db.get("backend") not in BACKENDS
            or db.get("file") not in (f"{which}.sql", f"{which}.sqlite3")
            or db["file"] not in manifest["files"]
            or not isinstance(db.get("tables"), dict)
        ):
            raise CorruptArchive(f"the manifest does not describe the {which} database")
    head = manifest.get("audit_head")
    if not (
        isinstance(head, dict)
        and isinstance(head.get("seq"), int)
        and isinstance(head.get("hash"), str)
    ):
        raise CorruptArchive("the manifest has no audit chain head")
    return opened


def _archive_check(opened: OpenedArchive) -> Check:
    files = opened.manifest["files"]
    how = "decrypted, " if opened.encrypted else ""
    return Check("archive", True, f"{how}{len(files)} files match their SHA-256 in the manifest")


def verify_backup(
    settings: Settings,
    path: Path,
    *,
    public_key: Ed25519PublicKey | None,
    identity_file: Path | None = None,
    progress: ProgressFactory = no_progress,
) -> CheckReport:
    """Check every member, then restore into scratch databases and check what came back.

    Never raises :class:`CorruptArchive`: a corrupt archive is a failed check.
    """
    report = CheckReport(path)
    with tempfile.TemporaryDirectory(prefix="echo-verify-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        try:
            opened = _open(path, work, identity_file, progress)
        except CorruptArchive as exc:
            report.checks.append(Check("archive", False, str(exc)))
            return report
        report.manifest = opened.manifest
        report.checks.append(_archive_check(opened))
        stem = scratch_name()
        urls: dict[str, str] = {}
        for which in DATABASES:
            db = opened.manifest["databases"][which]
            backend = BACKENDS[db["backend"]]
            url = stack.enter_context(
                backend.scratch(database_url(settings, which), f"{stem}_{which}", work, db)
            )
            backend.load(
                opened.member(db["file"]), url, replace=False, label=which, progress=progress
            )
            urls[which] = url
        report.checks += check_restored(
            opened, urls, public_key=public_key, where="scratch", progress=progress
        )
    return report


def restore_backup(
    settings: Settings,
    path: Path,
    *,
    public_key: Ed25519PublicKey | None,
    identity_file: Path | None = None,
    force: bool = False,
    progress: ProgressFactory = no_progress,
) -> CheckReport:
    """Restore both databases from ``path`` into the configured ones, then check them.

    Refuses (:class:`TargetNotEmpty`) a database that holds tables unless ``force``;
    raises :class:`CorruptArchive` before touching anything if the archive is damaged.
    """
    report = CheckReport(path)
    with tempfile.TemporaryDirectory(prefix="echo-restore-") as tmp:
        opened = _open(path, Path(tmp), identity_file, progress)
        report.manifest = opened.manifest
        report.checks.append(_archive_check(opened))
        urls: dict[str, str] = {which: database_url(settings, which) for which in DATABASES}
        for which in DATABASES:
            have = backend_for(urls[which]).name
            want = opened.manifest["databases"][which]["backend"]
            if have != want:
                raise BackupError(
                    f"the backup's {which} database is {want} but the configured one is {have}"
                )
        if not force:
            for which in DATABASES:
                tables = backend_for(urls[which]).table_count(urls[which])
                if tables:
                    where = make_url(urls[which]).render_as_string(hide_password=True)
                    raise TargetNotEmpty(
                        f"the {which} database {where} is not empty ({tables} tables): "
                        "restore refuses to overwrite it; pass --force to replace its contents"
                    )
        for which in DATABASES:
            db = opened.manifest["databases"][which]
            backend_for(urls[which]).load(
                opened.member(db["file"]),
                urls[which],
                replace=force,
                label=which,
                progress=progress,
            )
        copied, differing = _copy_checkpoints(opened.checkpoint_dir, settings.checkpoint_dir)
        report.notes.append(f"{copied} checkpoint files copied into {settings.checkpoint_dir}")
        report.notes += differing
        report.checks += check_restored(
            opened, urls, public_key=public_key, where="configured", progress=progress
        )
        newer = _newer_checkpoints(
            settings.checkpoint_dir, int(opened.manifest["audit_head"]["seq"])
        )
        if newer:
            report.notes.append(
                f"{newer} checkpoint files in {settings.checkpoint_dir} sign events after this "
                "backup: `audit verify` will report those events as deleted (they were lost "
                "with the database); see docs/operations.md"
            )
    return report


def count_rows(engine: Engine) -> dict[str, int]:
    names = sorted(inspect(engine).get_table_names())
    with transaction(engine, write=False) as conn:
        return {
            name: int(conn.execute(select(func.count()).select_from(table(name))).scalar_one())
            for name in names
        }


def check_restored(
    opened: OpenedArchive,
    urls: Mapping[str, str],
    *,
    public_key: Ed25519PublicKey | None,
    where: str,
    progress: ProgressFactory = no_progress,
) -> list[Check]:
    """Row counts equal to the manifest, migrations at head, the audit log intact."""
    manifest = opened.manifest
    checks: list[Check] = []
    engines = {which: make_engine(urls[which], pool_size=1) for which in DATABASES}
    try:
        for which in DATABASES:
            expected = manifest["databases"][which]["tables"]
            actual = count_rows(engines[which])
            wrong = [
                f"{name}: {actual.get(name, 'no')} rows, manifest {expected.get(name, 'none')}"
                for name in sorted(set(expected) | set(actual))
                if actual.get(name) != expected.get(name)
            ]
            detail = (
                f"{len(actual)} tables, {sum(actual.values())} rows, as in the manifest"
                if not wrong
                else "; ".join(wrong[:3])
            )
            checks.append(Check(f"{which} rows", not wrong, f"({where}) {detail}"))
        states = []
        at_head = True
        for which in DATABASES:
            before = migrate.current_revision(engines[which])
            migrate.upgrade(engines[which], which)
            ok = migrate.is_at_head(engines[which], which)
            at_head = at_head and ok
            after = migrate.current_revision(engines[which])
            moved = "" if before == after else f" (upgraded from {before})"
            states.append(f"{which} at {after}{moved}" + ("" if ok else " NOT at head"))
        checks.append(Check("migrations", at_head, ", ".join(states)))
        with transaction(engines["audit"], write=False) as conn:
            with progress("verifying the audit chain", count_events(conn)) as advance:
                result = verify_audit_log(
                    conn,
                    public_key=public_key,
                    sink=DirectorySink(opened.checkpoint_dir),
                    progress=advance,
                )
            head = read_head(conn)
        expected_head = manifest["audit_head"]
        head_ok = head == (int(expected_head["seq"]), str(expected_head["hash"]))
        detail = result.summary()
        if not head_ok:
            detail += (
                f"; chain head seq {head[0]} differs from the manifest's {expected_head['seq']}"
            )
        problems = [p.describe() for p in result.problems[:2]]
        problems += [i.describe() for i in result.checkpoint_issues[:2]]
        if problems:
            detail += " | " + " | ".join(problems)
        checks.append(Check("audit log", result.intact and head_ok, detail))
    finally:
        for engine in engines.values():
            engine.dispose()
    return checks


def _copy_checkpoints(source: Path, target: Path | None) -> tuple[int, list[str]]:
    """Put the archive's checkpoint files back where they live, never overwriting one."""
    if target is None or not source.is_dir():
        return 0, []
    target.mkdir(parents=True, exist_ok=True)
    copied, differing = 0, []
    for path in sorted(source.iterdir()):
        dest = target / path.name
        data = path.read_bytes()
        if dest.exists():
            if dest.read_bytes() != data:
                differing.append(f"checkpoint file {dest} differs from the archive's copy")
            continue
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        copied += 1
    return copied, differing


def _newer_checkpoints(directory: Path | None, head_seq: int) -> int:
    if directory is None or not directory.is_dir():
        return 0
    newer = 0
    for path in directory.glob("*.json"):
        try:
            if int(json.loads(path.read_bytes())["seq"]) > head_seq:
                newer += 1
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return newer
