"""Limits as an extension: each registered pipeline's concurrency and rate limits and fair
claims (its newest version's, ``prorch.model.limit_rules``), handed to the claim."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from prorch.engine.extension import Extension, Host
from prorch.model.limit_rules import ClaimLimit, Fairness, limits_of
from prorch.model.registry import Registry


class Limits(Extension):
    """The claim's limits, read from the registry at each pass (a class registered later counts)."""

    def setup(self, host: Host) -> None:
        self.registry: Registry = host.registry
        self.weights = getattr(host, "tenant_weights", ())

    def claim_limits(self) -> Mapping[str, ClaimLimit]:
        limits = {}
        for name, versions in self.registry.pipelines.items():
            limit = limits_of(versions[max(versions)])
            if limit is not None:
                limits[name] = self._weighted(limit)
        return limits

    def _weighted(self, limit: ClaimLimit) -> ClaimLimit:
        """A fair class without weights of its own takes the orchestrator's ``tenant_weights``."""
        if limit.fair is None or limit.fair.weights or not self.weights:
            return limit
        return dataclasses.replace(limit, fair=Fairness(self.weights))
