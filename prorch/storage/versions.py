"""Which code stored pipelines still need (``prorch versions``, ``Orchestrator.versions``): per
pipeline class, each version with its live (not ended) pipelines, their oldest, the ended ones
counted apart, and per patch how many live pipelines have it and how many predate it. A version
with no live pipeline, or a patch no live pipeline predates, is code a team can delete.

Counted by the store (``Store.version_groups``: one GROUP BY on SQL), then folded here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prorch.model.exceptions import NotRegisteredError
from prorch.model.registry import Registry
from prorch.storage.repository import VersionGroup


@dataclass
class PatchUsage:
    """One patch id of a class version: live pipelines created with it, and those that predate it
    (its old branch must stay while there are any)."""

    id: str
    live_with: int = 0
    live_without: int = 0
    oldest_without: datetime | None = None
    declared: str | None = None  # "patches", "deprecated_patches", or None: not declared by the code here


@dataclass
class VersionUsage:
    """One version of a pipeline class in the store."""

    name: str
    version: int
    live: int = 0
    oldest_live: datetime | None = None
    ended: int = 0
    registered: bool | None = None  # whether the code loaded here has it (None: no code loaded)
    steps: list[str] = field(default_factory=list)  # its step classes, "Name vN", when registered
    patches: list[PatchUsage] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "live": self.live, "ended": self.ended,
            "oldest_live": _iso(self.oldest_live), "registered": self.registered, "steps": self.steps,
            "patches": [
                {"id": p.id, "live_with": p.live_with, "live_without": p.live_without,
                 "oldest_without": _iso(p.oldest_without), "declared": p.declared}
                for p in self.patches
            ],
        }  # fmt: skip


def summarize(groups: Iterable[VersionGroup], registry: Registry | None) -> list[VersionUsage]:
    """Fold the store's groups into one ``VersionUsage`` per (name, version), sorted; with the
    code's ``registry``, say which versions it has and which patches each declares."""
    grouped: dict[tuple[str, int], list[VersionGroup]] = {}
    for group in groups:
        grouped.setdefault((group.name, group.version), []).append(group)
    return [_usage(name, version, found, registry) for (name, version), found in sorted(grouped.items())]


def _usage(name: str, version: int, groups: list[VersionGroup], registry: Registry | None) -> VersionUsage:
    usage = VersionUsage(name, version)
    live = [g for g in groups if not g.ended]
    usage.live = sum(g.count for g in live)
    usage.ended = sum(g.count for g in groups if g.ended)
    usage.oldest_live = _earliest(g.oldest for g in live)
    declared = _declared(usage, registry)
    ids = sorted({patch for g in groups for patch in g.patches} | set(declared))
    for patch in ids:
        without = [g for g in live if patch not in g.patches]
        usage.patches.append(
            PatchUsage(
                patch,
                live_with=usage.live - sum(g.count for g in without),
                live_without=sum(g.count for g in without),
                oldest_without=_earliest(g.oldest for g in without),
                declared=declared.get(patch),
            )
        )
    return usage


def _declared(usage: VersionUsage, registry: Registry | None) -> dict[str, str]:
    """The patch ids the loaded code declares for this version (and fills in what it knows)."""
    if registry is None:
        return {}
    try:
        cls = registry.pipeline(usage.name, usage.version)
    except NotRegisteredError:
        usage.registered = False
        return {}
    usage.registered = True
    usage.steps = [f"{step.name} v{step.version}" for step in cls.steps]
    found = {patch: "patches" for patch in cls.patches}
    found.update({patch: "deprecated_patches" for patch in cls.deprecated_patches})
    return found


def _earliest(moments: Iterable[datetime | None]) -> datetime | None:
    known = [moment for moment in moments if moment is not None]
    return min(known) if known else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def advice(usage: VersionUsage) -> list[str]:
    """What the counts let a team delete, one line each (``prorch versions`` prints them)."""
    label = f"{usage.name} v{usage.version}"
    if usage.live == 0:
        return [f"{label}: no live pipeline; its code can go (its {usage.ended} ended ones are only read)"]
    lines = []
    for patch in usage.patches:
        if patch.live_without == 0 and patch.declared == "patches":
            lines.append(
                f"{label}: no live pipeline predates patch {patch.id!r}; its old branch can go "
                "(move the id to deprecated_patches)"
            )
        elif patch.live_without and patch.declared == "deprecated_patches":
            lines.append(
                f"{label}: {patch.live_without} live pipeline(s) predate deprecated patch {patch.id!r} and are "
                "blocked; deploy code that lists it in patches, or cancel them"
            )
    return lines
