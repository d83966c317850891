"""Builds the running pieces from settings: engines, the password hasher, the services.

Used by the two composition roots, ``create_app`` and the CLI; nothing else constructs
engines or keys.
"""

from __future__ import annotations

import getpass
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Engine

from echo_auth.audit.checkpoints import (
    Checkpointer,
    CheckpointPolicy,
    DirectorySink,
    load_or_create_key,
    load_public_key_file,
)
from echo_auth.audit.events import Actor, Source
from echo_auth.audit.relay import RelayPolicy
from echo_auth.config import Settings
from echo_auth.db.async_reads import AsyncReader, make_async_reader
from echo_auth.db.engines import make_engine, normalize_url
from echo_auth.identity.access_tokens import AccessTokens
from echo_auth.identity.account import AccountService
from echo_auth.identity.admin import AdminService
from echo_auth.identity.auth import AuthService
from echo_auth.identity.email_flows import EmailFlows
from echo_auth.identity.mail import Mailer, mailer_from_settings
from echo_auth.identity.passwords import Argon2Hasher, Argon2Params
from echo_auth.identity.sessions import SessionPolicy
from echo_auth.identity.throttle import Limit, Throttle, ThrottlePolicy


@dataclass
class Runtime:
    settings: Settings
    pool_size: int = 10
    _engines: list[Engine] = field(default_factory=list, repr=False)

    @cached_property
    def identity(self) -> Engine:
        engine = make_engine(self.settings.identity_db_url, pool_size=self.pool_size)
        self._engines.append(engine)
        return engine

    @cached_property
    def audit(self) -> Engine:
        engine = make_engine(self.settings.audit_db_url, pool_size=self.pool_size)
        self._engines.append(engine)
        return engine

    @cached_property
    def identity_reads(self) -> Engine:
        """The identity database for one-statement reads on hot paths (session lookups)."""
        engine = make_engine(
            self.settings.identity_db_url, pool_size=self.pool_size, autocommit_reads=True
        )
        self._engines.append(engine)
        return engine

    @cached_property
    def identity_async_reads(self) -> AsyncReader | None:
        """Session lookups on the event loop (MySQL/MariaDB only; see db.async_reads)."""
        return make_async_reader(
            self.settings.identity_db_url, self.identity_reads.dialect, pool_size=self.pool_size
        )

    async def aclose(self) -> None:
        """Close what lives on the event loop; call before :meth:`close` at shutdown."""
        reader = self.__dict__.get("identity_async_reads")
        if reader is not None:
            await reader.close()

    def _engine_for(self, url: str, *candidates: str) -> Engine:
        """Share an engine between roles that use the very same URL."""
        for name in candidates:
            existing = self.__dict__.get(name)
            if existing is not None and str(existing.url) == str(normalize_url(url)):
                return existing  # type: ignore[no-any-return]
        engine = make_engine(url, pool_size=self.pool_size)
        self._engines.append(engine)
        return engine

    @cached_property
    def relay_identity(self) -> Engine:
        """The relay's connection to the outbox (claim and delete)."""
        s = self.settings
        if s.relay_identity_db_url == s.identity_db_url:
            return self.identity
        return self._engine_for(s.relay_identity_db_url)

    @cached_property
    def audit_reader(self) -> Engine:
        """Read-only access to the audit log for search, export and verify."""
        s = self.settings
        if s.audit_read_db_url == s.audit_db_url:
            return self.audit
        return self._engine_for(s.audit_read_db_url)

    @cached_property
    def checkpoint_key(self) -> Ed25519PrivateKey:
        assert self.settings.checkpoint_key_file is not None
        return load_or_create_key(self.settings.checkpoint_key_file)

    @cached_property
    def checkpoint_public_key(self) -> Ed25519PublicKey | None:
        """The key that verifies checkpoints, read without touching the private key.

        None when this installation has no checkpoint key yet (nothing was signed here).
        """
        s = self.settings
        assert s.checkpoint_public_key_file is not None and s.checkpoint_key_file is not None
        if s.checkpoint_public_key_file.exists():
            return load_public_key_file(s.checkpoint_public_key_file)
        if s.checkpoint_key_file.exists():
            return load_or_create_key(s.checkpoint_key_file, create=False).public_key()
        return None

    @cached_property
    def checkpoint_sink(self) -> DirectorySink:
        assert self.settings.checkpoint_dir is not None
        return DirectorySink(self.settings.checkpoint_dir)

    @cached_property
    def checkpointer(self) -> Checkpointer:
        s = self.settings
        return Checkpointer(
            audit=self.audit,
            key=self.checkpoint_key,
            sink=self.checkpoint_sink,
            origin=s.checkpoint_origin,
            policy=CheckpointPolicy(
                every_events=s.checkpoint_every_events,
                every=timedelta(seconds=s.checkpoint_every_s),
                idle_every=timedelta(seconds=s.checkpoint_idle_every_s),
            ),
        )

    @cached_property
    def hasher(self) -> Argon2Hasher:
        s = self.settings
        return Argon2Hasher(
            Argon2Params(s.argon2_time_cost, s.argon2_memory_kib, s.argon2_parallelism),
            workers=s.hash_workers,
            nice=s.hash_nice,
            queue_limit=s.hash_queue_limit,
        )

    @cached_property
    def session_policy(self) -> SessionPolicy:
        s = self.settings
        return SessionPolicy(
            idle_timeout=timedelta(seconds=s.session_idle_timeout_s),
            absolute_timeout=timedelta(seconds=s.session_absolute_timeout_s),
            touch_interval=timedelta(seconds=s.session_touch_interval_s),
        )

    @cached_property
    def throttle(self) -> Throttle:
        s = self.settings
        window = timedelta(seconds=s.throttle_window_s)
        lock = timedelta(seconds=s.login_lock_s)
        max_lock = timedelta(seconds=s.login_max_lock_s)
        account = Limit(s.login_max_failures, lock, max_lock, window)
        return Throttle(
            self.identity,
            ThrottlePolicy(
                account=account,
                ip=Limit(s.ip_max_failures, lock * 2, max_lock * 2, window, False),
                mfa=account,
            ),
        )

    @cached_property
    def auth(self) -> AuthService:
        s = self.settings
        return AuthService(
            identity=self.identity,
            reads=self.identity_reads,
            async_reads=self.identity_async_reads,
            hasher=self.hasher,
            sessions=self.session_policy,
            throttle=self.throttle,
            password_min_length=s.password_min_length,
            password_max_length=s.password_max_length,
        )

    @cached_property
    def account(self) -> AccountService:
        return AccountService(self.auth)

    @cached_property
    def admin(self) -> AdminService:
        return AdminService(self.identity, self.throttle)

    @cached_property
    def access_tokens(self) -> AccessTokens:
        s = self.settings
        return AccessTokens(
            s.keys_dir / "jwt",
            issuer=s.jwt_issuer,
            audience=s.jwt_audience,
            ttl=timedelta(seconds=s.jwt_ttl_s),
        )

    @cached_property
    def mailer(self) -> Mailer:
        return mailer_from_settings(self.settings)

    @cached_property
    def email_flows(self) -> EmailFlows:
        s = self.settings
        return EmailFlows(
            identity=self.identity,
            auth=self.auth,
            mailer=self.mailer,
            base_url=s.base_url,
            mail_from=s.mail_from,
            verify_ttl=timedelta(seconds=s.verify_token_ttl_s),
            reset_ttl=timedelta(seconds=s.reset_token_ttl_s),
        )

    @cached_property
    def relay_policy(self) -> RelayPolicy:
        s = self.settings
        return RelayPolicy(
            batch_size=s.relay_batch_size,
            max_attempts=s.relay_max_attempts,
            backoff_base_s=s.relay_backoff_base_s,
            backoff_max_s=s.relay_backoff_max_s,
            idle_sleep_s=s.relay_idle_sleep_s,
        )

    def upgrade_databases(self) -> None:
        from echo_auth.db import migrate  # alembic is heavy; only migrations need it

        migrate.upgrade(self.identity, "identity")
        migrate.upgrade(self.audit, "audit")

    def close(self) -> None:
        if "hasher" in self.__dict__:
            self.hasher.close()
        for engine in self._engines:
            engine.dispose()


def operator_actor() -> tuple[Actor, Source]:
    """Who runs a CLI command: the OS user on this host, as an ``admin`` actor."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    host = socket.gethostname()
    return Actor("admin", f"{user}@{host}"[:64], user), Source(
        ip=None, user_agent=f"echo-auth cli ({sys.platform})"
    )
