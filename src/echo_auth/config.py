"""Settings, read from the environment (``ECHO_*``) or a ``.env`` file.

Nothing is built at import time: callers create ``Settings()`` in the composition root
(``create_app`` or the CLI) and pass what is needed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigurationError(Exception):
    """A setting is missing, malformed or refused; the message says which and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ECHO_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path("./var")
    identity_db_url: str = ""
    audit_db_url: str = ""
    # Least privilege on MySQL (see `echo-auth db grants`): the relay's account for the
    # outbox, and a read-only account for audit reads. Both default to the URLs above.
    relay_identity_db_url: str = ""
    audit_read_db_url: str = ""
    base_url: str = "http://127.0.0.1:8000"
    smtp_url: str | None = None
    # Mail (see identity/mail.py): the sender, the SMTP timeout, the life of mailed links.
    mail_from: str = Field(default="Echo <no-reply@localhost>", min_length=3, max_length=320)
    smtp_timeout_s: float = Field(default=10.0, gt=0, le=300)
    verify_token_ttl_s: int = Field(default=60 * 60 * 24, ge=60)
    reset_token_ttl_s: int = Field(default=60 * 60, ge=60)
    checkpoint_dir: Path | None = None
    backup_dir: Path | None = None
    # Backups (see ops/backup.py): how many archives `backup create` keeps in the directory,
    # and the age public key(s) to encrypt them to (comma-separated; empty: not encrypted).
    backup_keep: int = Field(default=14, ge=1, le=100000)
    backup_age_recipient: str = ""

    # Password hashing (argon2id). Defaults are RFC 9106's second recommendation.
    argon2_time_cost: int = Field(default=3, ge=1, le=100)
    argon2_memory_kib: int = Field(default=65536, ge=8, le=4 * 1024 * 1024)
    argon2_parallelism: int = Field(default=4, ge=1, le=64)
    # Hashing runs in its own bounded pool, never on the event loop. One hash at a time
    # per process: with parallelism 4 each already runs 4 threads, and a second one in
    # flight only splits the CPU and the memory bandwidth (bench/README.md: 89% of the
    # hashing ceiling with 2, 96% with 1, at serve --workers 2 on 2 cores).
    hash_workers: int = Field(default=1, ge=1, le=64)
    hash_queue_limit: int = Field(default=256, ge=1)
    # The hashing threads' nice value (Linux): under a login storm, requests that need no
    # hash (session checks, admin reads) still get the CPU first. 0 turns it off.
    hash_nice: int = Field(default=19, ge=0, le=19)
    password_min_length: int = Field(default=12, ge=8, le=128)
    password_max_length: int = Field(default=1024, ge=128, le=4096)

    # Sessions.
    session_idle_timeout_s: int = Field(default=60 * 60 * 24 * 7, ge=60)
    session_absolute_timeout_s: int = Field(default=60 * 60 * 24 * 30, ge=60)
    session_touch_interval_s: int = Field(default=300, ge=1)
    bootstrap_token_ttl_s: int = Field(default=60 * 60 * 24, ge=60)

    # JWT access tokens (EdDSA, keys in $ECHO_DATA_DIR/keys/jwt/) and TOTP.
    jwt_ttl_s: int = Field(default=300, ge=30, le=60 * 60 * 24)
    jwt_issuer: str = ""  # empty: the base URL
    jwt_audience: str = Field(default="echo", min_length=1, max_length=200)
    totp_issuer: str = Field(default="Echo", min_length=1, max_length=100)

    # Brute-force protection (see identity/throttle.py).
    login_max_failures: int = Field(default=5, ge=1, le=1000)
    login_lock_s: int = Field(default=30, ge=1)
    login_max_lock_s: int = Field(default=900, ge=1)
    ip_max_failures: int = Field(default=50, ge=1, le=100000)
    throttle_window_s: int = Field(default=900, ge=1)

    # Logging: JSON lines on stderr by default.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    # HTTP.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    trusted_proxies: list[str] = Field(default_factory=list)

    # Signed checkpoints of the audit chain.
    checkpoint_key_file: Path | None = None
    # Verification needs only the public key; default: beside the private key (.pub.pem).
    checkpoint_public_key_file: Path | None = None
    checkpoint_every_events: int = Field(default=1000, ge=1)
    checkpoint_every_s: float = Field(default=60.0, gt=0)
    checkpoint_idle_every_s: float = Field(default=3600.0, gt=0)
    checkpoint_origin: str = Field(default="echo-audit", min_length=1, max_length=200)

    # Relay.
    relay_batch_size: int = Field(default=500, ge=1, le=5000)
    relay_idle_sleep_s: float = Field(default=0.2, gt=0)
    relay_max_attempts: int = Field(default=8, ge=1)
    relay_backoff_base_s: float = Field(default=1.0, gt=0)
    relay_backoff_max_s: float = Field(default=60.0, gt=0)

    @field_validator(
        "identity_db_url", "audit_db_url", "relay_identity_db_url", "audit_read_db_url"
    )
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _defaults_from_data_dir(self) -> Settings:
        if not self.identity_db_url:
            self.identity_db_url = f"sqlite:///{self.data_dir / 'identity.db'}"
        if not self.audit_db_url:
            self.audit_db_url = f"sqlite:///{self.data_dir / 'audit.db'}"
        if not self.relay_identity_db_url:
            self.relay_identity_db_url = self.identity_db_url
        if not self.audit_read_db_url:
            self.audit_read_db_url = self.audit_db_url
        if self.checkpoint_key_file is None:
            self.checkpoint_key_file = self.data_dir / "keys" / "checkpoint-ed25519.pem"
        if self.checkpoint_public_key_file is None:
            self.checkpoint_public_key_file = self.checkpoint_key_file.with_name(
                self.checkpoint_key_file.name.removesuffix(".pem") + ".pub.pem"
            )
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        if self.backup_dir is None:
            self.backup_dir = self.data_dir / "backups"
        if not self.jwt_issuer:
            self.jwt_issuer = self.base_url
        return self

    @property
    def uses_embedded_default(self) -> bool:
        return self.identity_db_url.startswith("sqlite") or self.audit_db_url.startswith("sqlite")

    @property
    def cookie_secure(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    def check_for_serving(self) -> None:
        """Refuse configurations that must never serve real users."""
        if self.env == "production" and self.uses_embedded_default:
            raise ConfigurationError(
                "ECHO_ENV=production refuses the embedded SQLite databases: set "
                "ECHO_IDENTITY_DB_URL and ECHO_AUDIT_DB_URL to MySQL/MariaDB URLs"
            )


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's report into one readable line."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"ECHO_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems}") from None
