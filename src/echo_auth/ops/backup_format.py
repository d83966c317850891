"""The backup archive: its name, its members, its manifest, its checksums, its encryption.

One archive per backup, ``echo-backup-<UTC yyyymmddThhmmssZ>.tar.gz``, or ``.tar.gz.age``
when encrypted to one or more age public keys (X25519, ``age1...``). Members::

    manifest.json              first, so that reading it needs no full pass
    identity.sql | .sqlite3    the identity database (mysqldump text, or a SQLite file)
    audit.sql | .sqlite3       the audit database, dumped after the identity one
    checkpoints/<stem>.json    the external checkpoint files that verification checks
    checkpoints/<stem>.sig       the chain against (copied from ECHO_CHECKPOINT_DIR)

``manifest.json`` names the SHA-256 and size of every other member; a member that is
missing, extra, or differs is a corrupt archive. Nothing here touches a database.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import pyrage

FORMAT = "echo-backup/1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_CHUNK = 1024 * 1024
_ARCHIVE = re.compile(r"^echo-backup-(\d{8}T\d{6}Z)\.tar\.gz(\.age)?$")
_MEMBER = re.compile(
    r"^(manifest\.json|(identity|audit)\.(sql|sqlite3)"
    r"|checkpoints/[0-9A-Za-z][0-9A-Za-z._-]{0,200}\.(json|sig))$"
)

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Advance]]


class BackupError(Exception):
    """A backup operation could not run (tool missing, database unreachable, bad setting)."""


class TargetNotEmpty(BackupError):
    """A restore would overwrite a database that holds tables; it needs --force."""


class CorruptArchive(Exception):
    """The archive does not hold what its manifest says: truncated, altered, or unreadable."""


@contextmanager
def no_progress(_label: str, _total: int | None) -> Iterator[Advance]:
    yield lambda _n: None


# -- what a database backend provides ----------------------------------------------------


@dataclass
class DumpResult:
    """One database's dump: its file, the row count of each table IN the dump, and more."""

    file: Path
    tables: dict[str, int]
    revision: str | None
    details: dict[str, Any] = field(default_factory=dict)
    head: tuple[int, str] | None = None  # the audit chain head held in the dump


class Backend(Protocol):
    """How one kind of database is dumped, loaded and given scratch space."""

    name: str
    suffix: str

    def dump(self, url: str, dest: Path, *, label: str, progress: ProgressFactory) -> DumpResult:
        """A consistent copy of the database at ``url`` into the new file ``dest``."""
        ...

    def table_count(self, url: str) -> int:
        """How many tables the database holds (0: empty or absent, safe to restore into)."""
        ...

    def load(
        self, dump: Path, url: str, *, replace: bool, label: str, progress: ProgressFactory
    ) -> None:
        """Restore ``dump`` into the database at ``url`` (``replace``: drop what is there)."""
        ...

    def scratch(
        self, url: str, name: str, workdir: Path, details: dict[str, Any]
    ) -> AbstractContextManager[str]:
        """An empty throwaway database beside ``url``, removed on exit; yields its URL."""
        ...

    def tool_versions(self) -> dict[str, str]: ...


# -- names, listing, retention -------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    created_at: datetime
    size: int
    encrypted: bool

    @property
    def name(self) -> str:
        return self.path.name


def archive_name(created_at: datetime, *, encrypted: bool) -> str:
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"echo-backup-{stamp}.tar.gz" + (".age" if encrypted else "")


def list_archives(directory: Path) -> list[ArchiveInfo]:
    """Echo's archives in ``directory``, newest first; other files are ignored."""
    if not directory.is_dir():
        return []
    found: list[ArchiveInfo] = []
    for path in directory.iterdir():
        match = _ARCHIVE.match(path.name)
        if match is None or not path.is_file():
            continue
        created = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        found.append(ArchiveInfo(path, created, path.stat().st_size, match.group(2) is not None))
    found.sort(key=lambda a: (a.created_at, a.name), reverse=True)
    return found


def apply_retention(directory: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` archives; returns the names deleted."""
    deleted: list[str] = []
    for archive in list_archives(directory)[max(keep, 1) :]:
        archive.path.unlink(missing_ok=True)
        deleted.append(archive.name)
    return deleted


# -- checksums and encryption ------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_recipients(values: Sequence[str]) -> list[pyrage.x25519.Recipient]:
    recipients = []
    for value in values:
        for item in re.split(r"[\s,]+", value.strip()):
            if not item:
                continue
            try:
                recipients.append(pyrage.x25519.Recipient.from_str(item))
            except pyrage.RecipientError:
                raise BackupError(f"not an age public key (age1...): {item[:80]}") from None
    return recipients


def load_identities(path: Path) -> list[pyrage.x25519.Identity]:
    """The age secret keys in a key file (``age-keygen`` format: comments, then the key)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BackupError(f"cannot read the age identity file {path}: {exc}") from None
    identities = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise BackupError(f"{path} holds a line that is not an age secret key") from None
    if not identities:
        raise BackupError(f"{path} holds no age secret key (AGE-SECRET-KEY-1...)")
    return identities


def encrypt_to(src: Path, dest: Path, recipients: Sequence[pyrage.x25519.Recipient]) -> None:
    try:
        pyrage.encrypt_file(str(src), str(dest), list(recipients))
    except pyrage.EncryptError as exc:
        raise BackupError(f"encryption failed: {exc}") from None
    os.chmod(dest, 0o600)


def decrypt_to(src: Path, dest: Path, identities: Sequence[pyrage.x25519.Identity]) -> None:
    try:
        pyrage.decrypt_file(str(src), str(dest), list(identities))
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise BackupError(
                f"{src.name}: the identity file holds no key this archive was encrypted to"
            ) from None
        raise CorruptArchive(f"cannot decrypt: {exc}") from None


# -- writing and reading ------------------------------------------------------------------


class _CountingReader:
    """A file whose reads advance a progress bar."""

    def __init__(self, fh: BinaryIO, advance: Advance) -> None:
        self._fh, self._advance = fh, advance

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._advance(len(data))
        return data


def write_archive(
    dest: Path,
    manifest: dict[str, Any],
    members: Sequence[tuple[str, Path]],
    *,
    progress: ProgressFactory = no_progress,
) -> None:
    """Write a new tar.gz at ``dest`` (mode 0600): the manifest first, then ``members``."""
    mtime = int(datetime.now(UTC).timestamp())
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    total = sum(path.stat().st_size for _, path in members)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with (
        os.fdopen(fd, "wb") as raw,
        progress("writing archive", total) as advance,
    ):
        with tarfile.open(
            fileobj=raw, mode="w:gz", compresslevel=6, format=tarfile.PAX_FORMAT
        ) as tar:
            for name, data_path in [(MANIFEST, None), *members]:
                info = tarfile.TarInfo(name)
                info.mode, info.mtime, info.uname, info.gname = 0o600, mtime, "", ""
                if data_path is None:
                    info.size = len(manifest_bytes)
                    tar.addfile(info, io.BytesIO(manifest_bytes))
                    continue
                info.size = data_path.stat().st_size
                with data_path.open("rb") as fh:
                    tar.addfile(info, _CountingReader(fh, advance))
        raw.flush()
        os.fsync(raw.fileno())


@dataclass
class OpenedArchive:
    """An archive extracted into a work directory, its checksums already checked."""

    path: Path
    encrypted: bool
    manifest: dict[str, Any]
    directory: Path

    def member(self, name: str) -> Path:
        return self.directory / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / CHECKPOINTS


def open_archive(
    path: Path,
    workdir: Path,
    *,
    identities: Sequence[pyrage.x25519.Identity] | None,
    progress: ProgressFactory = no_progress,
) -> OpenedArchive:
    """Decrypt (if ``.age``), extract, and check every member against the manifest.

    Raises :class:`CorruptArchive` for anything that does not match, and
    :class:`BackupError` when the archive cannot even be tried (no key, unreadable file).
    """
    encrypted = path.name.endswith(".age")
    tar_path = path
    if encrypted:
        if not identities:
            raise BackupError(f"{path.name} is encrypted: pass --identity FILE (the age key)")
        tar_path = workdir / "archive.tar.gz"
        decrypt_to(path, tar_path, identities)
    directory = workdir / "extracted"
    directory.mkdir(mode=0o700)
    actual = _extract(tar_path, directory, progress)
    if encrypted:
        tar_path.unlink()
    manifest = _read_manifest(directory)
    _check_members(manifest, actual)
    return OpenedArchive(path, encrypted, manifest, directory)


def _extract(tar_path: Path, directory: Path, progress: ProgressFactory) -> dict[str, str]:
    """Extract the allowed members as plain files; returns each member's SHA-256."""
    digests: dict[str, str] = {}
    try:
        size = tar_path.stat().st_size
    except OSError as exc:
        raise BackupError(f"cannot read {tar_path}: {exc.strerror}") from None
    try:
        with (
            tar_path.open("rb") as raw,
            progress("reading archive", size) as advance,
            tarfile.open(fileobj=_CountingReader(raw, advance), mode="r|gz") as tar,  # type: ignore[call-overload]
        ):
            for info in tar:
                name = info.name
                if not _MEMBER.match(name) or not info.isfile():
                    raise CorruptArchive(f"unexpected member {name[:100]!r}")
                if name in digests:
                    raise CorruptArchive(f"member {name} appears twice")
                source = tar.extractfile(info)
                assert source is not None  # a regular file always has contents
                target = directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with target.open("xb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                digests[name] = digest.hexdigest()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptArchive(f"the archive is damaged or truncated ({exc})") from None
    return digests


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text("utf-8"))
    except FileNotFoundError:
        raise CorruptArchive("no manifest.json in the archive") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptArchive(f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CorruptArchive(f"manifest format is {found!r}, expected {FORMAT!r}")
    return manifest


def _check_members(manifest: dict[str, Any], actual: dict[str, str]) -> None:
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise CorruptArchive("the manifest lists no files")
    problems: list[str] = []
    for name, entry in sorted(listed.items()):
        if name not in actual:
            problems.append(f"{name} is missing")
        elif not isinstance(entry, dict) or entry.get("sha256") != actual[name]:
            problems.append(f"{name}: SHA-256 differs from the manifest")
    for name in sorted(set(actual) - set(listed) - {MANIFEST}):
        problems.append(f"{name} is not in the manifest")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CorruptArchive("; ".join(problems[:3]) + more)


def read_manifest_only(path: Path) -> dict[str, Any] | None:
    """The manifest of an unencrypted archive (its first member), or None if unreadable."""
    if path.name.endswith(".age"):
        return None
    with (
        contextlib.suppress(tarfile.TarError, EOFError, zlib.error, OSError, ValueError),
        tarfile.open(path, mode="r|gz") as tar,
    ):
        for info in tar:
            source = tar.extractfile(info) if info.name == MANIFEST else None
            doc = json.loads(source.read()) if source is not None else None
            return doc if isinstance(doc, dict) else None
    return None
