"""``echo-auth backup``: create, list, verify and restore backups of both databases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from echo_auth.audit.events import Target
from echo_auth.cli.events import record_operator_event
from echo_auth.cli.main import EXIT_CHECK_FAILED, CliContext, cli, fail, one_line_errors, pass_ctx
from echo_auth.cli.progress import progress_bar
from echo_auth.ops.backup import BackupError, CorruptArchive, create_backup, list_backups
from echo_auth.ops.backup_format import sha256_file
from echo_auth.ops.backup_restore import CheckReport, restore_backup, verify_backup


@cli.group()
def backup() -> None:
    """Backups of both databases: create, list, verify, restore."""


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _archive_path(ctx: CliContext, given: str) -> Path:
    """FILE as given, a bare archive name in the backup directory, or ``latest`` there."""
    path = Path(given)
    directory = ctx.settings.backup_dir
    if not path.exists() and path.name == given and directory is not None:
        if given == "latest":
            found = list_backups(directory, read_manifests=False)
            if not found:
                fail(f"no backups in {directory}")
            return found[0].info.path
        path = directory / given
    if not path.is_file():
        fail(f"no such backup file: {given}")
    return path


@backup.command("create")
@click.option(
    "--to",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the archive to (default: ECHO_BACKUP_DIR).",
)
@click.option(
    "--encrypt-to",
    "recipients",
    multiple=True,
    metavar="AGE_PUBLIC_KEY",
    help="Encrypt to this age public key (age1...); repeatable. "
    "Default: ECHO_BACKUP_AGE_RECIPIENT, if set.",
)
@pass_ctx
@one_line_errors
def create(ctx: CliContext, directory: Path | None, recipients: tuple[str, ...]) -> None:
    """Back up both databases and the checkpoint files into one archive; apply retention."""
    settings = ctx.settings
    target = directory or settings.backup_dir
    assert target is not None  # the settings always fill it in
    wanted = list(recipients) or (
        [settings.backup_age_recipient] if settings.backup_age_recipient.strip() else []
    )
    runtime = ctx.runtime
    try:
        made = create_backup(
            settings, runtime.audit, directory=target, recipients=wanted, progress=progress_bar
        )
    except BackupError as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"cannot write the backup: {exc.strerror or exc} ({exc.filename or target})")
        return
    head_seq, head_digest = made.audit_head
    databases = made.manifest["databases"]
    record_operator_event(
        runtime,
        "system.backup.created",
        target=Target("backup", made.path.name[:64]),
        metadata={
            "file": made.path.name,
            "directory": str(made.path.parent)[:300],
            "bytes": made.size,
            "sha256": made.sha256,
            "encrypted": made.path.name.endswith(".age"),
            "audit_head": {"seq": head_seq, "chain_digest": head_digest},
            "audit_head_after_identity_dump": made.manifest["audit_head_after_identity_dump"][
                "seq"
            ],
            "backends": {which: db["backend"] for which, db in databases.items()},
            "retention_deleted": len(made.deleted),
        },
    )
    rows = {which: sum(db["tables"].values()) for which, db in databases.items()}
    click.echo(f"backup written: {made.path} ({_size(made.size)}, sha256 {made.sha256})")
    click.echo(
        f"identity: {rows['identity']} rows; audit: {rows['audit']} rows, chain head seq "
        f"{head_seq}; {made.manifest['checkpoints']['files']} checkpoints"
    )
    if made.deleted:
        click.echo(f"retention: removed {len(made.deleted)} older archives")


@backup.command("list")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to list (default: ECHO_BACKUP_DIR).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per archive.")
@pass_ctx
@one_line_errors
def list_(ctx: CliContext, directory: Path | None, as_json: bool) -> None:
    """The archives in the backup directory, newest first."""
    where = directory or ctx.settings.backup_dir
    assert where is not None
    found = list_backups(where)
    record_operator_event(
        ctx.runtime,
        "system.backup.listed",
        metadata={"directory": str(where)[:300], "archives": len(found)},
    )
    for item in found:
        head = (item.manifest or {}).get("audit_head", {}).get("seq")
        if as_json:
            doc = {
                "file": str(item.info.path),
                "created_at": item.info.created_at.isoformat().replace("+00:00", "Z"),
                "bytes": item.info.size,
                "encrypted": item.info.encrypted,
                "audit_head_seq": head,
            }
            click.echo(json.dumps(doc))
            continue
        state = "encrypted" if item.info.encrypted else "plain"
        detail = f"audit head seq {head}" if head is not None else ""
        click.echo(
            f"{item.info.created_at:%Y-%m-%d %H:%M:%SZ}  {_size(item.info.size):>10}  "
            f"{state:<9}  {item.info.name}  {detail}".rstrip()
        )
    if not found and not as_json:
        click.echo(f"no backups in {where}", err=True)


def _print_report(report: CheckReport, verdict_ok: str, verdict_bad: str) -> None:
    for check in report.checks:
        click.echo(f"{'ok' if check.ok else 'FAIL':<5} {check.name:<14} {check.detail}")
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"{report.archive.name}: {verdict_ok if report.ok else verdict_bad}")


_IDENTITY = click.option(
    "--identity",
    "identity_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="age secret key file, for an encrypted (.age) archive.",
)


@backup.command("verify")
@click.argument("file", metavar="FILE|latest")
@_IDENTITY
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@pass_ctx
@one_line_errors
def verify(ctx: CliContext, file: str, identity_file: Path | None, as_json: bool) -> None:
    """Check an archive: checksums, a full restore into scratch databases, row counts,
    migrations, and `audit verify` against its checkpoints. Exit 0 good, 1 bad, 2 could
    not run."""
    path = _archive_path(ctx, file)
    try:
        report = verify_backup(
            ctx.settings,
            path,
            public_key=ctx.runtime.checkpoint_public_key,
            identity_file=identity_file,
            progress=progress_bar,
        )
    except BackupError as exc:
        fail(str(exc))
        return
    head = (report.manifest or {}).get("audit_head", {})
    record_operator_event(
        ctx.runtime,
        "system.backup.verified",
        outcome="success" if report.ok else "failure",
        reason=None if report.ok else "check_failed",
        target=Target("backup", path.name[:64]),
        metadata={
            "file": path.name,
            "sha256": sha256_file(path),
            "audit_head": {"seq": head.get("seq"), "chain_digest": head.get("hash")},
            "failed_checks": [c.name for c in report.checks if not c.ok],
        },
    )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report, "GOOD (restored into scratch databases and checked)", "BAD")
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)


@backup.command("restore")
@click.argument("file", metavar="FILE|latest")
@_IDENTITY
@click.option("--force", is_flag=True, help="Replace the contents of non-empty databases.")
@pass_ctx
@one_line_errors
def restore(ctx: CliContext, file: str, identity_file: Path | None, force: bool) -> None:
    """Restore both databases from an archive into the configured ones, then check them.

    Stop `serve` and every relay first. Refuses non-empty databases unless --force.
    """
    path = _archive_path(ctx, file)
    try:
        report = restore_backup(
            ctx.settings,
            path,
            public_key=ctx.runtime.checkpoint_public_key,
            identity_file=identity_file,
            force=force,
            progress=progress_bar,
        )
    except CorruptArchive as exc:
        fail(f"{path.name} is corrupt, nothing was restored: {exc}", EXIT_CHECK_FAILED)
        return
    except BackupError as exc:
        fail(str(exc))
        return
    manifest = report.manifest or {}
    head = manifest.get("audit_head", {})
    # Recorded in the restored identity database's outbox, so the event survives.
    record_operator_event(
        ctx.runtime,
        "system.backup.restored",
        outcome="success" if report.ok else "failure",
        reason=None if report.ok else "check_failed",
        target=Target("backup", path.name[:64]),
        metadata={
            "file": path.name,
            "created_at": manifest.get("created_at"),
            "forced": force,
            "audit_head": {"seq": head.get("seq"), "chain_digest": head.get("hash")},
            "failed_checks": [c.name for c in report.checks if not c.ok],
        },
    )
    _print_report(report, "RESTORED and checked", "RESTORED, BUT A CHECK FAILED")
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)
