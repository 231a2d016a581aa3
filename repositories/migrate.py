"""Creating and upgrading the SQL schema with the Alembic migrations shipped in the package
(``repositories/migrations``), once per store version: workers starting together take a lock,
and a store migrated by a newer prorch is used as it is when its extra migrations only add."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

from prorch.model.exceptions import SchemaTooNewError
from repositories.schema import HISTORY_TABLE, SCHEMA_REVISION, VERSION_TABLE, schema_history

logger = logging.getLogger("prorch.repositories.migrate")


class Migratable(Protocol):
    """What an upgrade needs of a backend (``SQLBackend`` and its dialects)."""

    def connect(self, *, write: bool) -> contextlib.AbstractContextManager[Connection]: ...

    def lock_schema(self, connection: Connection) -> None: ...


def stored_revision(connection: Connection) -> str | None:
    """The store's schema revision, or None for an empty store."""
    try:
        with connection.begin_nested():
            return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    except SQLAlchemyError as exc:
        if getattr(exc, "connection_invalidated", False) or connection.invalidated:
            raise  # the connection was lost, not the table: an unreachable store, not an empty one
        return None


MIGRATIONS = Path(__file__).parent / "migrations"


def known_revisions(migrations: Path = MIGRATIONS) -> frozenset[str]:
    """The revisions this prorch ships (file names ``NNNN_*.py``): no Alembic import needed."""
    return frozenset(path.name[:4] for path in (migrations / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


KNOWN_REVISIONS = known_revisions()


def upgrade(backend: Migratable, revision: str = "head", *, migrations: Path = MIGRATIONS) -> None:
    """Create or upgrade the schema with the migrations shipped in the package, under a lock so
    that workers starting together do it once. A store already migrated by a newer prorch is used
    as it is when every migration this one does not know only adds; otherwise it is refused."""
    with backend.connect(write=True) as connection:
        stored = stored_revision(connection)
        if revision == "head" and stored == SCHEMA_REVISION and migrations == MIGRATIONS:
            return  # the common case: no Alembic import at all
        known = KNOWN_REVISIONS if migrations == MIGRATIONS else known_revisions(migrations)
        if stored is not None and stored not in known:
            _accept_newer(backend, connection, stored, known)
            return
        backend.lock_schema(connection)
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", str(migrations))
        config.attributes["connection"] = connection
        logger.info("upgrading schema of %r to %s", backend, revision)
        command.upgrade(config, revision)
        if HISTORY_TABLE in inspect(connection).get_table_names():
            recorded = set(connection.execute(select(schema_history.c.revision)).scalars())
            for script in ScriptDirectory.from_config(config).walk_revisions():
                if script.revision not in recorded:
                    additive = bool(getattr(script.module, "additive", False))
                    connection.execute(schema_history.insert().values(revision=script.revision, additive=additive))


def _accept_newer(backend: Migratable, connection: Connection, stored: str, known: frozenset[str]) -> None:
    """Work on a schema from a newer prorch only if all its extra migrations are additive."""
    newest = max(known)
    refused = SchemaTooNewError(
        f"store schema {stored} is newer than this prorch understands ({newest}); upgrade prorch"
    )
    try:
        query = select(schema_history.c.revision, schema_history.c.additive)
        rows = {revision: additive for revision, additive in connection.execute(query)}
    except SQLAlchemyError as exc:  # no history table: nothing says the extra migrations only add
        raise refused from exc
    extra = {revision: additive for revision, additive in rows.items() if revision not in known}
    if stored not in extra or not all(extra.values()):
        raise refused
    logger.info(
        "store schema %s of %r is newer than this prorch (%s); its extra migrations (%s) only add, so it is used as is",
        stored, backend, newest, ", ".join(sorted(extra)),
    )  # fmt: skip
