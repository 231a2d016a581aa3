"""``prorch.repository``, the path documented before 1.3 (#26): the module is now ``prorch.storage.repository``."""

from prorch.storage.repository import *  # noqa: F403
