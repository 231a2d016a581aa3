"""A repository with only the four seed methods and no capability: the floor the engine must
work on. It keeps rows in a JSON file through TinyDB exactly like the prorch 1.0.1 README."""

from __future__ import annotations

from typing import Any

from tinydb import TinyDB, where

from prorch import IRepository, Metadata, SavedItem


def seed_backend(path: str) -> Any:
    """A seed-style repository class bound to ``path`` (what a user's class looks like)."""

    class SeedTinyDBRepository(IRepository):
        def __init__(self, model: str) -> None:
            super().__init__(model)
            self._db = TinyDB(path)
            self._table = self._db.table(Metadata.TABLE_NAMES[model])

        def get(self, uuid: str) -> Any:
            return self._table.get(where("uuid") == uuid)

        def save(self, data: dict[str, Any]) -> SavedItem:
            return SavedItem(identifier=self._table.insert(data))

        def update(self, uuid: str, data: dict[str, Any]) -> None:
            self._table.update(data, where("uuid") == uuid)

        def search(self, filter: list[Any]) -> list[Any]:  # noqa: A002
            field, value = filter
            return self._table.search(where(field) == value)

    return SeedTinyDBRepository
