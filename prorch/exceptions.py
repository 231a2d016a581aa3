"""``prorch.exceptions``, the path documented before 1.3 (#26): the module is now ``prorch.model.exceptions``."""

from prorch.model.exceptions import *  # noqa: F403
