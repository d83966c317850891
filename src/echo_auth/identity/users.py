"""Users: email normalisation, roles, creation and lookup (in the caller's transaction)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Connection, func, insert, select

from echo_auth.audit.events import uuid7
from echo_auth.db.identity_schema import users
from echo_auth.identity.errors import InvalidInput, WeakPassword

ROLES: Final = ("user", "admin", "auditor")
MAX_EMAIL_LENGTH: Final = 254


def normalize_email(raw: str) -> str:
    """The one form an address is stored and looked up in.

    NFKC-normalised (so full-width and other compatibility look-alikes fold to one form),
    trimmed, syntax-checked without DNS, and lower-cased whole: Echo treats addresses
    case-insensitively, as almost every mail provider does.
    """
    if "\x00" in raw:
        raise InvalidInput("email", "contains a NUL character")
    text = unicodedata.normalize("NFKC", raw).strip()
    if not text or len(text) > MAX_EMAIL_LENGTH:
        raise InvalidInput("email", f"must be an address of at most {MAX_EMAIL_LENGTH} characters")
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidInput("email", str(exc)) from None
    return checked.normalized.lower()


def check_password_policy(
    password: str, *, min_length: int, max_length: int, email: str | None = None
) -> None:
    """Refuse a password that breaks the policy, after NIST SP 800-63B (section 3.1.1.2).

    Length counts Unicode code points: at least ``min_length``, at most ``max_length``.
    Any character is allowed but NUL, and no composition rules are imposed (no "one digit,
    one symbol"). Refused as guessable: an entry of the common and breached password
    lists (see ``common_passwords``), ignoring case, and, given the account's ``email``,
    anything containing its local part when that is at least 4 characters long. Raises
    :class:`WeakPassword` whose message says which rule failed.
    """
    from echo_auth.identity.common_passwords import is_common_password

    if "\x00" in password:
        raise WeakPassword("password", "may not contain a NUL character")
    length = len(password)
    if length < min_length:
        raise WeakPassword("password", f"must be at least {min_length} characters long")
    if length > max_length:
        raise WeakPassword("password", f"must be at most {max_length} characters long")
    if is_common_password(password):
        raise WeakPassword(
            "password", "is too common: it appears in lists of breached or often-used passwords"
        )
    local_part = email.rpartition("@")[0].casefold() if email else ""
    if len(local_part) >= 4 and local_part in password.casefold():
        raise WeakPassword("password", "may not contain the name part of your email address")


def format_roles(roles: set[str] | list[str] | tuple[str, ...]) -> str:
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise InvalidInput(
            "roles", f"unknown role {sorted(unknown)[0]!r}; roles are {', '.join(ROLES)}"
        )
    return " ".join(sorted(set(roles) | {"user"}))


def parse_roles(stored: str) -> list[str]:
    return stored.split()


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    roles: list[str]
    email_verified: bool
    mfa_enabled: bool
    disabled: bool
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> User:
        return cls(
            id=row.id,
            email=row.email,
            roles=parse_roles(row.roles),
            email_verified=row.email_verified_at is not None,
            mfa_enabled=bool(row.mfa_enabled),
            disabled=row.disabled_at is not None,
            created_at=row.created_at,
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "email_verified": self.email_verified,
            "roles": self.roles,
            "mfa_enabled": self.mfa_enabled,
            "created_at": self.created_at,
        }


USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.roles,
    users.c.email_verified_at,
    users.c.mfa_enabled,
    users.c.disabled_at,
    users.c.created_at,
)


def find_by_email(conn: Connection, email: str) -> tuple[User, str] | None:
    """The user and their password hash, or None."""
    row = conn.execute(
        select(*USER_COLUMNS, users.c.password_hash).where(users.c.email == email)
    ).first()
    return None if row is None else (User.from_row(row), row.password_hash)


def find_by_id(conn: Connection, user_id: str) -> User | None:
    row = conn.execute(select(*USER_COLUMNS).where(users.c.id == user_id)).first()
    return None if row is None else User.from_row(row)


def email_exists(conn: Connection, email: str) -> bool:
    return conn.execute(select(users.c.id).where(users.c.email == email)).first() is not None


def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())


def insert_user(
    conn: Connection, *, email: str, password_hash: str, roles: str, verified: bool = False
) -> User:
    now = datetime.now(UTC)
    user_id = str(uuid7())
    conn.execute(
        insert(users).values(
            id=user_id,
            email=email,
            password_hash=password_hash,
            roles=roles,
            email_verified_at=now if verified else None,
            mfa_enabled=False,
            created_at=now,
            updated_at=now,
        )
    )
    return User(user_id, email, parse_roles(roles), verified, False, False, now)
