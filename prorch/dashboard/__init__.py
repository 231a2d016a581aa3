"""The web dashboard (``prorch dashboard``, extra ``prorch[dashboard]``): overview, pipelines,
one pipeline, guarded actions, and the JSON API under ``/api/``."""

from __future__ import annotations

from prorch.dashboard.app import create_app

__all__ = ["create_app"]
