"""``prorch.records``, the path documented before 1.3 (#26): the module is now ``prorch.model.records``."""

from prorch.model.records import *  # noqa: F403
