"""Alembic environment: prorch always hands in an open connection (inside a locked transaction)."""

from alembic import context

from repositories.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
