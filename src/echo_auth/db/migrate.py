"""Run each database's own migration history (Alembic), programmatically."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

Database = Literal["identity", "audit"]
_HERE = Path(__file__).parent / "migrations"


def alembic_config(which: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE / which))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(_HERE / which / "versions"))
    return cfg


def upgrade(engine: Engine, which: Database, revision: str = "head") -> None:
    cfg = alembic_config(which)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def head_revision(which: Database) -> str | None:
    return ScriptDirectory.from_config(alembic_config(which)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_at_head(engine: Engine, which: Database) -> bool:
    return current_revision(engine) == head_revision(which)
