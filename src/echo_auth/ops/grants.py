"""Least-privilege MySQL/MariaDB accounts for Echo, and the GRANTs that bound them.

Four accounts, each with only what its job needs:

=============  ==============================================================================
``echo_app``     the web app: reads and writes identity tables; may only INSERT (and read)
                 the outbox; nothing at all in the audit database.
``echo_relay``   the relay: claims and deletes outbox rows; INSERT and SELECT on audit rows
                 and checkpoints, UPDATE only on the one-row chain head; never UPDATE or
                 DELETE on audit history.
``echo_auditor`` SELECT on the audit database, nothing else (audit search, export, verify).
``echo_owner``   the break-glass owner: all privileges on both databases, for migrations
                 and `db grants`; keep its password offline. Even it meets the triggers.
=============  ==============================================================================

Table-level grants need the tables to exist: run ``echo-auth db upgrade`` first, and
``db grants --apply`` again after a migration that adds tables.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError

from echo_auth.config import ConfigurationError
from echo_auth.db import audit_schema, identity_schema

APP, RELAY, AUDITOR, OWNER = "app", "relay", "auditor", "owner"
ROLES = (APP, RELAY, AUDITOR, OWNER)
CRUD = "SELECT, INSERT, UPDATE, DELETE"

# Identity tables that are not plain app data get their own rules below.
_QUEUE_TABLES = {"audit_outbox", "audit_dead_letters"}


@dataclass(frozen=True)
class Grant:
    role: str
    privileges: str
    database: str
    table: str | None  # None: the whole database


@dataclass
class GrantPlan:
    identity_db: str
    audit_db: str
    client_host: str
    prefix: str = "echo"
    grants: list[Grant] = field(default_factory=list)

    def account(self, role: str) -> str:
        return f"{self.prefix}_{role}"

    def roles_on(self, database: str) -> list[str]:
        return sorted({g.role for g in self.grants if g.database == database})


def _database_of(url: str, what: str) -> tuple[URL, str]:
    parsed = make_url(url)
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise ConfigurationError(f"db grants is for MySQL/MariaDB; the {what} database is not")
    if not parsed.database:
        raise ConfigurationError(f"the {what} database URL names no database")
    return parsed, parsed.database


def plan_grants(
    identity_url: str, audit_url: str, client_host: str, prefix: str = "echo"
) -> GrantPlan:
    if not prefix.replace("_", "").isalnum() or len(prefix) > 20:
        raise ConfigurationError("the account prefix must be letters, digits or _ (20 at most)")
    _, identity_db = _database_of(identity_url, "identity")
    _, audit_db = _database_of(audit_url, "audit")
    plan = GrantPlan(identity_db, audit_db, client_host, prefix)
    add = plan.grants.append
    app_tables = sorted(set(identity_schema.metadata.tables) - _QUEUE_TABLES)
    for table in app_tables:
        add(Grant(APP, CRUD, identity_db, table))
    add(Grant(APP, "SELECT, INSERT", identity_db, "audit_outbox"))
    add(Grant(APP, "SELECT", identity_db, "audit_dead_letters"))
    add(Grant(APP, "SELECT", identity_db, "alembic_version"))

    add(Grant(RELAY, CRUD, identity_db, "audit_outbox"))
    add(Grant(RELAY, "SELECT, INSERT, DELETE", identity_db, "audit_dead_letters"))
    add(Grant(RELAY, "SELECT", identity_db, "alembic_version"))
    for table in audit_schema.APPEND_ONLY_TABLES:
        add(Grant(RELAY, "SELECT, INSERT", audit_db, table))
    add(Grant(RELAY, "SELECT, UPDATE", audit_db, "chain_head"))
    add(Grant(RELAY, "SELECT", audit_db, "alembic_version"))

    add(Grant(AUDITOR, "SELECT", audit_db, None))

    add(Grant(OWNER, "ALL PRIVILEGES", identity_db, None))
    add(Grant(OWNER, "ALL PRIVILEGES", audit_db, None))
    return plan


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def account_sql(account: str, host: str) -> str:
    return f"{_quote_string(account)}@{_quote_string(host)}"


def statements_for(plan: GrantPlan, database: str, passwords: dict[str, str] | None) -> list[str]:
    """The SQL for the accounts that need grants on ``database``.

    With ``passwords`` None the password is a placeholder, for printing.
    """
    out: list[str] = []
    for role in plan.roles_on(database):
        who = account_sql(plan.account(role), plan.client_host)
        secret = "<generated>" if passwords is None else passwords[role]
        out.append(f"CREATE USER IF NOT EXISTS {who} IDENTIFIED BY {_quote_string(secret)}")
        out.append(f"ALTER USER {who} IDENTIFIED BY {_quote_string(secret)}")
    for g in plan.grants:
        if g.database != database:
            continue
        on = _quote_ident(g.database) + "." + ("*" if g.table is None else _quote_ident(g.table))
        who = account_sql(plan.account(g.role), plan.client_host)
        out.append(f"GRANT {g.privileges} ON {on} TO {who}")
    return out


def new_passwords(roles: Iterable[str] = ROLES) -> dict[str, str]:
    return {role: secrets.token_urlsafe(24) for role in roles}


def account_urls(
    plan: GrantPlan, identity_url: str, audit_url: str, passwords: dict[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The ECHO_* settings that serve Echo with these accounts, and the owner's (migrations)."""
    identity, _ = _database_of(identity_url, "identity")
    audit, _ = _database_of(audit_url, "audit")

    def as_(url: URL, role: str) -> str:
        return url.set(username=plan.account(role), password=passwords[role]).render_as_string(
            hide_password=False
        )

    serving = {
        "ECHO_IDENTITY_DB_URL": as_(identity, APP),
        "ECHO_AUDIT_DB_URL": as_(audit, RELAY),
        "ECHO_RELAY_IDENTITY_DB_URL": as_(identity, RELAY),
        "ECHO_AUDIT_READ_DB_URL": as_(audit, AUDITOR),
    }
    owner = {
        "ECHO_IDENTITY_DB_URL": as_(identity, OWNER),
        "ECHO_AUDIT_DB_URL": as_(audit, OWNER),
    }
    return serving, owner


def apply_statements(server_url: str, statements: list[str], admin_url: str | None) -> None:
    """Run ``statements`` on the server of ``server_url`` as the admin account.

    ``admin_url`` (if given) supplies the account; host and port stay those of the server.
    Statements go to the driver as they are (no parameter formatting: hosts like '%').
    """
    import pymysql

    target = make_url(server_url)
    try:
        account = make_url(admin_url) if admin_url else target
    except ArgumentError:
        # Not quoted back: the text may hold a password.
        raise ConfigurationError(
            "--admin-url is not a database URL (mysql://user:password@host)"
        ) from None
    conn = pymysql.connect(
        host=target.host or "127.0.0.1",
        port=target.port or 3306,
        user=account.username or "root",
        password=account.password or "",
        autocommit=True,
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()
