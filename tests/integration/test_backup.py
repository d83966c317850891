"""Backups on both backends: create, list, verify (a full restore into scratch databases),
restore into fresh databases with every row back, a corrupted archive rejected, restore
refused onto non-empty databases, age encryption, retention.

The CLI round trip runs the real ``python -m echo_auth backup ...`` processes; the rest
calls the ops functions in-process to stay quick.
"""

from __future__ import annotations

import gzip
import io
import os
import secrets
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select, text

from echo_auth.audit.events import Actor, AuditEvent, Source
from echo_auth.audit.outbox import enqueue_event
from echo_auth.audit.verify import verify_audit_log
from echo_auth.cli.backup import cli
from echo_auth.config import Settings
from echo_auth.db.audit_schema import audit_events
from echo_auth.db.engines import make_engine, transaction
from echo_auth.db.identity_schema import audit_outbox, sessions, users
from echo_auth.ops.backup import (
    BackupError,
    CorruptArchive,
    CreatedBackup,
    TargetNotEmpty,
    create_backup,
    list_backups,
)
from echo_auth.ops.backup_restore import restore_backup, verify_backup
from echo_auth.runtime import Runtime
from tests.fixtures.app import PASSWORD, deliver
from tests.fixtures.db import Databases, MySQLServer, make_settings

TIMEOUT_S = 120
CHEAP_ARGON2 = {
    "ECHO_ARGON2_TIME_COST": "1",
    "ECHO_ARGON2_MEMORY_KIB": "1024",
    "ECHO_ARGON2_PARALLELISM": "1",
}


# -- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"echo-auth {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


def _env(settings: Settings) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_")}
    return {
        **base,
        **CHEAP_ARGON2,
        "ECHO_ENV": "test",
        "ECHO_DATA_DIR": str(settings.data_dir),
        "ECHO_IDENTITY_DB_URL": settings.identity_db_url,
        "ECHO_AUDIT_DB_URL": settings.audit_db_url,
    }


def start_cli(cwd: Path, settings: Settings, args: Sequence[str]) -> subprocess.Popen[str]:
    """Start ``python -m echo_auth ARGS``; stdin is not a tty, so no progress bars."""
    return subprocess.Popen(
        [sys.executable, "-m", "echo_auth", *args],
        cwd=cwd,  # no stray .env file is read
        env=_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_cli(proc: subprocess.Popen[str]) -> Done:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return Done(tuple(str(a) for a in proc.args[3:]), proc.returncode, out, err)  # type: ignore[index]


def run_cli(cwd: Path, *calls: tuple[Settings, Sequence[str]]) -> list[Done]:
    """Run the calls at the same time (they must not depend on each other)."""
    return [finish_cli(p) for p in [start_cli(cwd, s, args) for s, args in calls]]


def ok(result: Done) -> Done:
    assert result.code == 0, str(result)
    assert "Traceback" not in result.stderr, str(result)
    return result


def one_line_error(result: Done, code: int) -> str:
    assert result.code == code, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echo-auth: "), str(result)
    return lines[0]


@pytest.fixture
def fresh(
    databases: Databases, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Databases]:
    """A second, empty pair of databases on the same backend, to restore into."""
    if databases.backend == "sqlite":
        where = tmp_path / "restored"
        yield Databases(
            "sqlite", f"sqlite:///{where / 'identity.db'}", f"sqlite:///{where / 'audit.db'}"
        )
        return
    server: MySQLServer = request.getfixturevalue("mysql_server")
    stem = f"echo_r{os.getpid()}_{secrets.token_hex(4)}"
    names = (f"{stem}_identity", f"{stem}_audit")
    for name in names:
        server.create_database(name)
    try:
        yield Databases("mysql", server.url(names[0]), server.url(names[1]), *names)
    finally:
        for name in names:
            server.drop_database(name)


def _populate(runtime: Runtime) -> None:
    """Users, a session, delivered events, a checkpoint, and events still in the outbox."""
    source = Source(ip="203.0.113.7", user_agent="pytest")
    auth = runtime.auth
    for n in range(3):
        auth.signup(f"user{n}@example.com", PASSWORD, source)
    auth.signup("o'quote@example.com", PASSWORD, source)  # quoting in the dump
    auth.login("user0@example.com", PASSWORD, source)
    deliver(runtime)
    runtime.checkpointer.maybe_checkpoint(force=True)
    with transaction(runtime.identity) as conn:  # undelivered at backup time
        for n in range(3):
            enqueue_event(
                conn,
                AuditEvent(
                    "auth.logout",
                    "success",
                    Actor("user", f"u{n}", "semi;colon),(paren'quote\\back\nline"),
                    metadata={"n": n},
                ),
            )


def _rows(engine: Engine, table: Any, order: Any) -> list[dict[str, Any]]:
    with transaction(engine, write=False) as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(order))]


def _settings_for(settings: Settings, dbs: Databases) -> Settings:
    return make_settings(settings.data_dir, dbs)


def _create(runtime: Runtime, **kwargs: Any) -> CreatedBackup:
    s = runtime.settings
    assert s.backup_dir is not None
    return create_backup(
        s, runtime.audit, directory=kwargs.pop("directory", s.backup_dir), **kwargs
    )


def _repack(archive: Path, dest: Path, change: str) -> None:
    """Rewrite ``archive`` with one byte of member ``change`` flipped, manifest untouched."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(dest, "w:gz") as out:
        for info in src.getmembers():
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == change:
                data = data[:100] + bytes([data[100] ^ 0x01]) + data[101:]
            out.addfile(info, io.BytesIO(data))


def in_process(settings: Settings, *args: str) -> Done:
    """The same command through Click's runner: no interpreter start-up, same exit codes."""
    env = {k: None for k in os.environ if k.startswith("ECHO_")}
    env.update(_env(settings))
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return Done(tuple(args), result.exit_code, result.stdout, result.stderr)


# -- the CLI round trip ---------------------------------------------------------------------


@pytest.mark.slow
def test_cli_round_trip_into_fresh_databases(
    runtime: Runtime, settings: Settings, fresh: Databases, tmp_path: Path
) -> None:
    _populate(runtime)
    [created] = run_cli(tmp_path, (settings, ["backup", "create"]))
    assert "backup written:" in ok(created).stdout
    assert settings.backup_dir is not None
    [listed] = list_backups(settings.backup_dir)
    assert not listed.info.encrypted and listed.info.size > 0
    assert listed.manifest is not None
    archive = listed.info.path
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    # The creation is itself an audit event, with no secret in it.
    with transaction(runtime.identity, write=False) as conn:
        payloads = conn.execute(select(audit_outbox.c.payload)).scalars().all()
    [created_event] = [p for p in payloads if "system.backup.created" in p]
    assert archive.name in created_event and "password" not in created_event

    restored = _settings_for(settings, fresh)
    verifying = start_cli(tmp_path, settings, ["backup", "verify", "latest"])
    # Meanwhile, in-process: a damaged copy, the listing, a restore onto live data.
    bad = tmp_path / "damaged.tar.gz"
    dump = "identity.sqlite3" if runtime.identity.dialect.name == "sqlite" else "identity.sql"
    _repack(archive, bad, dump)
    damaged = in_process(settings, "backup", "verify", str(bad))
    assert damaged.code == 1, str(damaged)
    assert "FAIL  archive" in damaged.stdout and "SHA-256 differs" in damaged.stdout
    shown = ok(in_process(settings, "backup", "list"))
    assert archive.name in shown.stdout and "plain" in shown.stdout
    refused = in_process(settings, "backup", "restore", str(archive))
    assert "is not empty" in one_line_error(refused, 2)
    assert "GOOD" in ok(finish_cli(verifying)).stdout

    [restore] = run_cli(tmp_path, (restored, ["backup", "restore", archive.name]))
    assert "RESTORED and checked" in ok(restore).stdout

    target = Runtime(restored, pool_size=2)
    try:
        assert _rows(target.identity, users, users.c.id) == _rows(
            runtime.identity, users, users.c.id
        )
        assert _rows(target.identity, sessions, sessions.c.id) == _rows(
            runtime.identity, sessions, sessions.c.id
        )
        assert _rows(target.audit, audit_events, audit_events.c.seq) == _rows(
            runtime.audit, audit_events, audit_events.c.seq
        )
        # The outbox came back too; the relay delivers it and the restore event, once each.
        deliver(target)
        with transaction(target.audit, write=False) as conn:
            rows = conn.execute(select(audit_events.c.action, audit_events.c.outcome)).all()
            report = verify_audit_log(
                conn, public_key=target.checkpoint_public_key, sink=target.checkpoint_sink
            )
        assert [r.action for r in rows].count("auth.logout") == 3
        assert ("system.backup.restored", "success") in [tuple(r) for r in rows]
        assert report.intact, report.summary()
    finally:
        target.close()


# -- in-process checks ----------------------------------------------------------------------


def test_manifest_retention_and_corruption(runtime: Runtime, tmp_path: Path) -> None:
    _populate(runtime)
    directory = tmp_path / "offsite"
    directory.mkdir()
    old = [f"echo-backup-2020010{day}T000000Z.tar.gz" for day in range(1, 6)]
    for name in [*old, "notes.txt", "echo-backup-20200109T000000Z.tar.gz.age"]:
        (directory / name).write_bytes(b"x")
    made = _create(runtime, directory=directory, keep=3)

    # Retention: the newest three archives stay, other files are never touched.
    kept = sorted(p.name for p in directory.iterdir())
    newest_old = ["echo-backup-20200109T000000Z.tar.gz.age", old[-1]]
    assert kept == sorted([made.path.name, *newest_old, "notes.txt"])
    assert sorted(made.deleted) == sorted(old[:-1])
    assert list_backups(directory)[0].info.name == made.path.name

    manifest = made.manifest
    assert manifest["format"] == "echo-backup/1"
    identity, audit = manifest["databases"]["identity"], manifest["databases"]["audit"]
    assert identity["tables"]["users"] == 4 and identity["tables"]["audit_outbox"] == 3
    with transaction(runtime.audit, write=False) as conn:
        seq = conn.execute(text("SELECT MAX(seq) FROM audit_events")).scalar_one()
    assert audit["tables"]["audit_events"] == seq == manifest["audit_head"]["seq"]
    assert manifest["audit_head_after_identity_dump"]["seq"] <= seq
    assert manifest["checkpoints"]["files"] >= 1
    assert set(manifest["files"]) >= {identity["file"], audit["file"]}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert manifest["tools"]["python"] and manifest["echo_version"]

    # Corruption: truncated, a flipped byte in a member, an extra member.
    s = runtime.settings
    key = runtime.checkpoint_public_key
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(made.path.read_bytes()[: made.size // 2])
    report = verify_backup(s, truncated, public_key=key)
    assert not report.ok
    assert "damaged or truncated" in report.checks[0].detail

    flipped = tmp_path / "flipped.tar.gz"
    _repack(made.path, flipped, audit["file"])
    report = verify_backup(s, flipped, public_key=key)
    assert [c.ok for c in report.checks] == [False]
    assert audit["file"] in report.checks[0].detail
    assert "SHA-256 differs" in report.checks[0].detail

    extra = tmp_path / "extra.tar.gz"
    with tarfile.open(made.path, "r:gz") as src, tarfile.open(extra, "w:gz") as out:
        for info in src.getmembers():
            out.addfile(info, src.extractfile(info))
        info = tarfile.TarInfo("checkpoints/999999999999-forged.json")
        info.size = 2
        out.addfile(info, io.BytesIO(b"{}"))
    assert not verify_backup(s, extra, public_key=key).ok
    with pytest.raises(CorruptArchive):
        restore_backup(s, flipped, public_key=key, force=True)


def test_restore_refuses_non_empty_databases_unless_forced(runtime: Runtime) -> None:
    _populate(runtime)
    made = _create(runtime)
    s = runtime.settings
    with pytest.raises(TargetNotEmpty, match=r"not empty .*--force"):
        restore_backup(s, made.path, public_key=runtime.checkpoint_public_key)
    # Changes made after the backup are undone by a forced restore.
    runtime.auth.signup("later@example.com", PASSWORD, Source())
    report = restore_backup(s, made.path, public_key=runtime.checkpoint_public_key, force=True)
    assert report.ok, report.as_dict()
    with transaction(runtime.identity, write=False) as conn:
        emails = conn.execute(select(users.c.email)).scalars().all()
    assert "later@example.com" not in emails and "user0@example.com" in emails


@pytest.mark.slow
def test_encrypted_round_trip(
    runtime: Runtime, settings: Settings, fresh: Databases, tmp_path: Path
) -> None:
    _populate(runtime)
    key = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "backup.key"
    key_file.write_text(f"# created by the test\n# public key: {key.to_public()}\n{key}\n")
    made = _create(runtime, recipients=[str(key.to_public())])
    assert made.path.name.endswith(".tar.gz.age")
    raw = made.path.read_bytes()
    assert raw.startswith(b"age-encryption.org/v1") and b"user0@example.com" not in raw
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(raw)
    [listed] = list_backups(made.path.parent)
    assert listed.info.encrypted and listed.manifest is None

    public_key = runtime.checkpoint_public_key
    with pytest.raises(BackupError, match="encrypted: pass --identity"):
        verify_backup(settings, made.path, public_key=public_key)
    stranger = tmp_path / "stranger.key"
    stranger.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    with pytest.raises(BackupError, match="no key this archive was encrypted to"):
        verify_backup(settings, made.path, public_key=public_key, identity_file=stranger)

    restored = _settings_for(settings, fresh)
    report = restore_backup(restored, made.path, public_key=public_key, identity_file=key_file)
    assert report.ok, report.as_dict()
    assert report.checks[0].detail.startswith("decrypted")
    engine = make_engine(restored.identity_db_url, pool_size=1)
    try:
        assert _rows(engine, users, users.c.id) == _rows(runtime.identity, users, users.c.id)
    finally:
        engine.dispose()
