"""Backups of MySQL/MariaDB databases with ``mariadb-dump`` (or ``mysqldump``).

``--single-transaction`` dumps every InnoDB table from one consistent snapshot without
locking the writers. Credentials go to the tools in a temporary option file (mode 0600,
``--defaults-extra-file``), never on a command line where ``ps`` would show them.

Row counts, the Alembic revision and the chain head are read from the dump itself, not
from the live database, so that they describe exactly what the archive holds: each
``INSERT INTO `t` VALUES (...),(...);`` line is counted after its quoted strings are
blanked out (mysqldump writes one statement per line and escapes newlines).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy.engine.url import URL

from echo_auth.db.engines import normalize_url
from echo_auth.ops.backup_format import BackupError, DumpResult, ProgressFactory

DUMP_TOOLS = ("mariadb-dump", "mysqldump")
CLIENT_TOOLS = ("mariadb", "mysql")
_INSTALL_HINT = "install the MariaDB client tools (Debian: apt-get install mariadb-client)"
_CREATE = re.compile(rb"^CREATE TABLE `((?:[^`]|``)+)` \(")
_COLUMN = re.compile(rb"^  `((?:[^`]|``)+)` ")
_INSERT = re.compile(rb"^INSERT INTO `((?:[^`]|``)+)` VALUES ?")
_STRING = re.compile(rb"'(?:[^'\\]|\\.)*'", re.DOTALL)
_VALUE = re.compile(rb"'(?:[^'\\]|\\.)*'|[^,()']+", re.DOTALL)
# Triggers, views and routines carry the account that created them; restoring them as
# another account would need SUPER, so the restored objects take the restoring account.
_DEFINER = re.compile(rb"/\*!500(?:13|17|20) DEFINER=`(?:[^`]|``)*`@`(?:[^`]|``)*`\s*\*/ ?")
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Tables whose first row the manifest needs (the chain head, the schema revision).
_FIRST_ROW_OF = {"chain_head", "alembic_version"}


def _tool(names: tuple[str, ...]) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise BackupError(f"{' or '.join(names)} not found: {_INSTALL_HINT}")


def _option_value(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


@contextmanager
def defaults_file(url: URL) -> Iterator[Path]:
    """A [client] option file with the account of ``url``, mode 0600, removed afterwards."""
    lines = [
        "[client]",
        f"user={_option_value(url.username or 'root')}",
        f"password={_option_value(url.password or '')}",
        f"host={_option_value(url.host or '127.0.0.1')}",
        f"port={int(url.port or 3306)}",
    ]
    socket = url.query.get("unix_socket")
    if isinstance(socket, str):
        lines.append(f"socket={_option_value(socket)}")
    fd, name = tempfile.mkstemp(prefix="echo-mysql-", suffix=".cnf")  # created 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        yield Path(name)
    finally:
        os.unlink(name)


def _connect(url: URL, database: str | None = None) -> pymysql.Connection:
    socket = url.query.get("unix_socket")
    try:
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            database=database,
            unix_socket=socket if isinstance(socket, str) else None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=5,
        )
    except pymysql.MySQLError as exc:
        raise BackupError(f"cannot connect to {_where(url)}: {_reason(exc)}") from None


def _where(url: URL) -> str:
    return f"MySQL at {url.host or '127.0.0.1'}:{url.port or 3306}"


def _reason(exc: BaseException) -> str:
    return str(exc.args[-1] if exc.args else exc).splitlines()[0][:300]


def _version_of(tool: str) -> str:
    try:
        out = subprocess.run(  # noqa: S603 - a tool found on PATH, fixed arguments
            [tool, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0][:200] if out.stdout.strip() else "unknown"


def scan_dump(path: Path) -> tuple[dict[str, int], dict[str, dict[str, bytes]]]:
    """Rows per table in a mysqldump file, and the first row of a few tables by column.

    An INSERT runs from its ``INSERT INTO`` line to the line that ends in ``;``: older
    dump tools write all its rows on that one line, newer MariaDB ones a row per line.
    """
    counts: dict[str, int] = {}
    columns: dict[str, list[str]] = {}
    first_values: dict[str, list[bytes]] = {}
    creating: str | None = None
    inserting: str | None = None
    with path.open("rb") as fh:
        for line in fh:
            if inserting is None:
                if creating is not None:
                    column = _COLUMN.match(line)
                    if column:
                        columns[creating].append(column.group(1).replace(b"``", b"`").decode())
                        continue
                    creating = None
                if line.startswith(b"CREATE TABLE `"):
                    create = _CREATE.match(line)
                    if create:
                        creating = create.group(1).replace(b"``", b"`").decode()
                        counts.setdefault(creating, 0)
                        columns[creating] = []
                    continue
                insert = _INSERT.match(line) if line.startswith(b"INSERT INTO `") else None
                if insert is None:
                    continue
                inserting = insert.group(1).replace(b"``", b"`").decode()
                body = line[insert.end() :]
            else:
                body = line
            counts[inserting] = counts.get(inserting, 0) + _STRING.sub(b"''", body).count(b"(")
            if inserting in _FIRST_ROW_OF:
                seen = first_values.setdefault(inserting, [])
                wanted = len(columns.get(inserting, [])) - len(seen)
                if wanted > 0:
                    tokens = (t.strip() for t in _VALUE.findall(body))
                    seen += [t for t in tokens if t and t != b";"][:wanted]
            if body.rstrip().endswith(b";"):
                inserting = None
    first_rows = {
        table: dict(zip(columns.get(table, []), values, strict=False))
        for table, values in first_values.items()
    }
    return counts, first_rows


def strip_definer(line: bytes) -> bytes:
    """A dump line without the DEFINER of the trigger, view or routine it creates."""
    if line.startswith((b"/*!50003 CREATE*/", b"/*!50001 ")):
        return _DEFINER.sub(b"", line)
    return line


def _unquote(value: bytes | None) -> str | None:
    if value is None or value == b"NULL":
        return None
    text = value.decode("utf-8")
    return text[1:-1] if text.startswith("'") and text.endswith("'") else text


class MySQLBackend:
    name = "mysql"
    suffix = ".sql"

    def dump(self, url: str, dest: Path, *, label: str, progress: ProgressFactory) -> DumpResult:
        parsed = normalize_url(url)
        database = parsed.database
        assert database is not None  # normalize_url refuses a MySQL URL without one
        tool = _tool(DUMP_TOOLS)
        details = self._details(parsed, database)
        args = [
            "--single-transaction",
            "--routines",
            "--triggers",
            "--hex-blob",
            "--default-character-set=utf8mb4",
            "--no-tablespaces",
            "--skip-dump-date",
        ]
        if "mariadb" not in _version_of(tool).lower():
            # Oracle's mysqldump: no GTID statements, and no histogram query MariaDB lacks.
            args += ["--set-gtid-purged=OFF", "--column-statistics=0"]
        with defaults_file(parsed) as cnf, tempfile.TemporaryFile() as err:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, progress(f"dumping {label}", None) as advance:
                proc = subprocess.Popen(  # noqa: S603 - the dump tool, no shell, no secret in argv
                    [tool, f"--defaults-extra-file={cnf}", *args, database],
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                )
                written = 0
                while proc.poll() is None:
                    time.sleep(0.1)
                    size = dest.stat().st_size
                    advance(size - written)
                    written = size
            if proc.returncode != 0:
                err.seek(0)
                message = err.read().decode(errors="replace").strip().splitlines()
                reason = message[-1][:300] if message else f"exit status {proc.returncode}"
                raise BackupError(f"{Path(tool).name} failed on the {label} database: {reason}")
        counts, first_rows = scan_dump(dest)
        revision = _unquote(first_rows.get("alembic_version", {}).get("version_num"))
        head = None
        if "chain_head" in counts:
            row = first_rows.get("chain_head")
            if row is None:
                head = (0, "0" * 64)
            else:
                seq, digest = _unquote(row.get("seq")), _unquote(row.get("hash"))
                if seq is None or digest is None or not seq.isdigit():
                    raise BackupError(f"cannot read the chain head from the {label} dump")
                head = (int(seq), digest)
        return DumpResult(dest, counts, revision, details, head)

    def _details(self, url: URL, database: str) -> dict[str, Any]:
        conn = _connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                    "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                    (database,),
                )
                row = cur.fetchone()
                if row is None:
                    raise BackupError(f"database {database} does not exist on {_where(url)}")
                cur.execute("SELECT VERSION()")
                version = cur.fetchone()
        finally:
            conn.close()
        return {
            "database": database,
            "server": f"{url.host or '127.0.0.1'}:{url.port or 3306}",
            "server_version": str(version[0]) if version else "unknown",
            "charset": str(row[0]),
            "collation": str(row[1]),
        }

    def table_count(self, url: str) -> int:
        parsed = normalize_url(url)
        conn = _connect(parsed)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                    (parsed.database,),
                )
                exists = cur.fetchone()
                if not exists or not exists[0]:
                    raise BackupError(
                        f"database {parsed.database} does not exist on {_where(parsed)}: create "
                        "it first (CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)"
                    )
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
                    (parsed.database,),
                )
                found = cur.fetchone()
        finally:
            conn.close()
        return int(found[0]) if found else 0

    def _drop_everything(self, url: URL, database: str) -> None:
        conn = _connect(url, database)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = %s",
                    (database,),
                )
                found = [(str(name), str(kind)) for name, kind in cur.fetchall()]
                cur.execute("SET FOREIGN_KEY_CHECKS = 0")
                for name, kind in sorted(found, key=lambda item: item[1] != "VIEW"):
                    what = "VIEW" if kind == "VIEW" else "TABLE"
                    cur.execute(f"DROP {what} IF EXISTS `{name.replace('`', '``')}`")
        finally:
            conn.close()

    def load(
        self, dump: Path, url: str, *, replace: bool, label: str, progress: ProgressFactory
    ) -> None:
        parsed = normalize_url(url)
        database = parsed.database
        assert database is not None
        client = _tool(CLIENT_TOOLS)
        if replace:
            self._drop_everything(parsed, database)
        with (
            defaults_file(parsed) as cnf,
            tempfile.TemporaryFile() as err,
            dump.open("rb") as source,
            progress(f"restoring {label}", dump.stat().st_size) as advance,
        ):
            proc = subprocess.Popen(  # noqa: S603 - the client tool, no shell, no secret in argv
                [
                    client,
                    f"--defaults-extra-file={cnf}",
                    "--default-character-set=utf8mb4",
                    "--batch",
                    database,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            assert proc.stdin is not None
            try:
                for line in source:
                    proc.stdin.write(strip_definer(line))
                    advance(len(line))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the client stopped early: its exit status and message say why
            returncode = proc.wait()
            if returncode != 0:
                err.seek(0)
                message = err.read().decode(errors="replace").strip().splitlines()
                reason = message[-1][:300] if message else f"exit status {returncode}"
                raise BackupError(f"restoring the {label} database failed: {reason}")

    @contextmanager
    def scratch(self, url: str, name: str, workdir: Path, details: dict[str, Any]) -> Iterator[str]:
        parsed = normalize_url(url)
        if parsed.get_backend_name() != "mysql":
            raise BackupError(
                "this backup holds MySQL dumps: verifying it restores them into scratch "
                "databases, so ECHO_IDENTITY_DB_URL and ECHO_AUDIT_DB_URL must name a MySQL server"
            )
        charset = str(details.get("charset") or "utf8mb4")
        collation = str(details.get("collation") or "utf8mb4_bin")
        if not (_NAME.match(name) and _NAME.match(charset) and _NAME.match(collation)):
            raise BackupError(f"refusing odd names for a scratch database: {name}")
        conn = _connect(parsed)
        try:
            with conn.cursor() as cur:
                try:
                    cur.execute(
                        f"CREATE DATABASE `{name}` CHARACTER SET {charset} COLLATE {collation}"
                    )
                except pymysql.MySQLError as exc:
                    raise BackupError(
                        f"cannot create the scratch database {name}: {_reason(exc)} (the "
                        "account needs CREATE and DROP on databases named echo_verify_%)"
                    ) from None
        finally:
            conn.close()
        try:
            yield parsed.set(database=name).render_as_string(hide_password=False)
        finally:
            conn = _connect(parsed)
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            finally:
                conn.close()

    def tool_versions(self) -> dict[str, str]:
        versions = {}
        for names in (DUMP_TOOLS, CLIENT_TOOLS):
            try:
                tool = _tool(names)
            except BackupError:
                continue
            versions[Path(tool).name] = _version_of(tool)
        return versions


def scratch_name() -> str:
    return f"echo_verify_{secrets.token_hex(4)}"
