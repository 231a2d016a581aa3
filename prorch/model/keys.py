"""Creation keys: a caller's own name for a pipeline (an order id, a request id), so that creating
it twice, or from four processes at once, stores it once.

The pipeline's uuid is derived from its key (UUID version 5 in a namespace of prorch's own), so
every backend's uniqueness of uuids is what makes creation exactly-once, with no second index to
keep in step, and finding a pipeline by its key is a lookup by uuid.
"""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

from prorch.model.exceptions import InvalidKeyError

MAX_KEY_LENGTH = 200
KEY_NAMESPACE = uuid_module.UUID("6f1c8a52-3d0e-5b7a-9c4e-2a8f0d6b1e37")
MAX_UUID_LENGTH = 36  # the uuid columns' width


def check_key(key: Any) -> str:
    """``key`` if it is a usable creation key, else ``InvalidKeyError`` saying why."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"a creation key must be a string, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidKeyError(f"a creation key must be 1 to {MAX_KEY_LENGTH} characters long, not {len(key)}")
    if "\x00" in key:
        raise InvalidKeyError("a creation key must not contain a NUL character")
    return key


def uuid_for_key(key: str) -> str:
    """The uuid of the pipeline created with ``key``: the same in every process, for ever."""
    return str(uuid_module.uuid5(KEY_NAMESPACE, check_key(key)))


def check_uuid(uuid: Any) -> str:
    """A uuid given to ``create(uuid=...)``: it must fit the stores' uuid columns."""
    if not isinstance(uuid, str) or not 1 <= len(uuid) <= MAX_UUID_LENGTH or "\x00" in uuid:
        shown = f"{len(uuid)} characters" if isinstance(uuid, str) else type(uuid).__name__
        raise InvalidKeyError(
            f"uuid= takes a uuid of at most {MAX_UUID_LENGTH} characters, not {shown}; "
            "for an identifier of your own, pass key= (up to 200 characters)"
        )
    return uuid
