"""The repository URLs prorch knows, for error messages. A module of its own so that a backend
(``sql``) can name them without importing the package that imports it (``repositories``)."""

SUPPORTED_SCHEMES = (
    "sqlite:///PATH",
    "postgresql://USER@HOST/DB",
    "tinydb:///PATH.json",
    "memory://",
    "any SQLAlchemy URL",
)
