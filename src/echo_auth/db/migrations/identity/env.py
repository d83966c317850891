"""Alembic environment for the identity database; run through echo_auth.db.migrate."""

from alembic import context

from echo_auth.db.identity_schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
