"""Brute-force protection: counters per account, per source IP, per known device.

Every password or MFA attempt first *reserves* a slot on each of its keys with one
conditional UPDATE (``failures < limit``), committed before the slow check runs. Fifty
parallel guesses therefore get exactly ``limit`` tries, never more: the counting is done
by the database, not by reading a number and writing it back (the race of Zitadel's
GHSA-7h8m-vrxx-vr4m). A success gives the account's slot back; a failure keeps it, and
the attempt that uses up the last slot locks the key for a delay that doubles with each
lock (capped).

Keys:

* ``email:<hash>`` for the address being tried (known or not, so the throttle itself
  reveals nothing);
* ``ip:<addr>`` for the source address, with a larger limit; a success does not reset it
  (an attacker must not clear it by logging into an account of their own);
* ``device:<id>`` replaces the email key for a browser that presents a valid device
  cookie of that account (OWASP's device cookies): failures from elsewhere do not lock
  the account's owner out of their own device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, Engine, and_, bindparam, case, insert, null, or_, select, update

from echo_auth.db.engines import transaction
from echo_auth.db.identity_schema import login_throttles
from echo_auth.db.types import UTCDateTime
from echo_auth.identity.errors import DomainError

Scope = Literal["email", "ip", "device", "mfa"]


class RateLimited(DomainError):
    """Too many attempts; wait before trying again."""

    code = "rate_limited"
    keep_work = True

    def __init__(self, retry_after: int, scope: Scope) -> None:
        super().__init__(f"too many attempts; try again in {retry_after} seconds")
        self.retry_after = retry_after
        self.scope = scope


@dataclass(frozen=True)
class Limit:
    attempts: int
    lock: timedelta
    max_lock: timedelta
    window: timedelta
    reset_on_success: bool = True

    def lock_for(self, lockouts: int) -> timedelta:
        return min(self.max_lock, self.lock * (1 << min(lockouts, 16)))


@dataclass(frozen=True)
class ThrottlePolicy:
    account: Limit = Limit(5, timedelta(seconds=30), timedelta(minutes=15), timedelta(minutes=15))
    ip: Limit = Limit(50, timedelta(minutes=1), timedelta(minutes=30), timedelta(minutes=15), False)
    mfa: Limit = Limit(5, timedelta(seconds=30), timedelta(minutes=15), timedelta(minutes=15))

    def limit(self, scope: Scope) -> Limit:
        if scope == "ip":
            return self.ip
        if scope == "mfa":
            return self.mfa
        return self.account


@dataclass(frozen=True)
class Key:
    scope: Scope
    value: str

    @property
    def name(self) -> str:
        return f"{self.scope}:{self.value}"[:128]

    @classmethod
    def email(cls, email: str) -> Key:
        return cls("email", hashlib.sha256(email.encode()).hexdigest()[:40])


@dataclass(frozen=True)
class LockStarted:
    key: Key
    until: datetime


_c = login_throttles.c
# The row's count has run out: a lock that is over, or failures older than the window.
_STALE = or_(
    and_(_c.locked_until.is_not(None), _c.locked_until <= bindparam("now", type_=UTCDateTime())),
    and_(_c.locked_until.is_(None), _c.updated_at < bindparam("window_start", type_=UTCDateTime())),
)
# Take one attempt: on a stale row start over at 1, else count one more while under the
# limit and unlocked. Built once; the assignments are ordered so that MySQL (which
# evaluates them left to right, each seeing the ones before) and SQLite (which sees the
# old row throughout) agree: _STALE reads only columns assigned after it.
_TAKE = (
    update(login_throttles)
    .where(
        _c.key == bindparam("name"),
        or_(_STALE, and_(_c.failures < bindparam("attempts"), _c.locked_until.is_(None))),
    )
    .ordered_values(
        (_c.failures, case((_STALE, 1), else_=_c.failures + 1)),
        (_c.locked_until, case((_STALE, null()), else_=_c.locked_until)),
        (_c.updated_at, bindparam("now", type_=UTCDateTime())),
    )
)
_LOCKED_UNTIL = select(_c.locked_until).where(_c.key == bindparam("name"))
_CREATE = (
    insert(login_throttles)
    .prefix_with("IGNORE", dialect="mysql")
    .prefix_with("OR IGNORE", dialect="sqlite")
)


class Throttle:
    def __init__(self, engine: Engine, policy: ThrottlePolicy) -> None:
        self.engine = engine
        self.policy = policy

    def reserve(self, keys: Sequence[Key]) -> None:
        """Take one attempt on every key, or raise :class:`RateLimited` taking none.

        Commits on its own, before the caller's slow check, so that concurrent attempts
        see each other's reservations. One conditional ``UPDATE`` per key, in one
        transaction; a key seen for the first time gets its row first, in a transaction
        of its own, and the reservation starts over.
        """
        for _ in range(2):
            now = datetime.now(UTC)
            missing = self._try_reserve(keys, now)
            if not missing:
                return
            # Rows are created in their own transaction: an INSERT IGNORE that meets an
            # existing row takes a shared lock, and upgrading it later would deadlock.
            with transaction(self.engine) as conn:
                conn.execute(
                    _CREATE, [{"key": n, "failures": 0, "updated_at": now} for n in missing]
                )
        raise RuntimeError("throttle rows vanished while reserving")  # pragma: no cover

    def _try_reserve(self, keys: Sequence[Key], now: datetime) -> list[str]:
        """Reserve on every key; returns the names that have no row yet (nothing taken)."""
        with transaction(self.engine) as conn:
            # Keys are always locked in the same order, so reservations never deadlock.
            for key in sorted(keys, key=lambda k: k.name):
                limit = self.policy.limit(key.scope)
                taken = conn.execute(
                    _TAKE,
                    {
                        "name": key.name,
                        "now": now,
                        "window_start": now - limit.window,
                        "attempts": limit.attempts,
                    },
                ).rowcount
                if taken == 1:
                    continue
                locked_until = conn.execute(_LOCKED_UNTIL, {"name": key.name}).first()
                conn.rollback()  # give back the slots taken on the earlier keys
                if locked_until is None:
                    return [k.name for k in keys]
                until = locked_until[0]
                retry = (until - now).total_seconds() if until else 1.0
                raise RateLimited(max(1, int(retry + 0.999)), key.scope)
        return []

    def failed(self, conn: Connection, keys: Sequence[Key]) -> list[LockStarted]:
        """The attempt failed: its slots stay used; a key that is now full gets locked."""
        now = datetime.now(UTC)
        started: list[LockStarted] = []
        c = login_throttles.c
        for key in keys:
            limit = self.policy.limit(key.scope)
            row = conn.execute(
                select(c.failures, c.lockouts, c.locked_until).where(c.key == key.name)
            ).first()
            if row is None or row.failures < limit.attempts or row.locked_until is not None:
                continue
            until = now + limit.lock_for(row.lockouts)
            locked = conn.execute(
                update(login_throttles)
                .where(c.key == key.name, c.locked_until.is_(None))
                .values(locked_until=until, lockouts=c.lockouts + 1, updated_at=now)
            ).rowcount
            if locked == 1:
                started.append(LockStarted(key, until))
        return started

    def succeeded(self, conn: Connection, keys: Sequence[Key]) -> None:
        """The attempt succeeded: clear the account's count; give back only its own IP slot.

        An IP's count is never cleared by a success: an attacker could otherwise reset it by
        logging into an account of their own between guesses.
        """
        now = datetime.now(UTC)
        c = login_throttles.c
        for key in keys:
            if self.policy.limit(key.scope).reset_on_success:
                values = {"failures": 0, "lockouts": 0, "locked_until": None, "updated_at": now}
                conn.execute(update(login_throttles).where(c.key == key.name).values(**values))
            else:
                conn.execute(
                    update(login_throttles)
                    .where(c.key == key.name, c.failures > 0, c.locked_until.is_(None))
                    .values(failures=c.failures - 1)
                )

    def unlock(self, conn: Connection, keys: Sequence[Key]) -> int:
        """Lift locks (an admin's unlock); returns how many keys were locked."""
        now = datetime.now(UTC)
        result = conn.execute(
            update(login_throttles)
            .where(
                login_throttles.c.key.in_([k.name for k in keys]),
                login_throttles.c.locked_until.is_not(None),
            )
            .values(failures=0, locked_until=None, updated_at=now)
        )
        return int(result.rowcount)
