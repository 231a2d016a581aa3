"""Patches: a change of a hook's behaviour made in place, without a new version, that only
pipelines created after it was deployed see (``self.patched("fix-rounding")``).

A pipeline class declares its patch ids (``patches = ["fix-rounding"]``); a new pipeline
records every id its class declares, in ``metadata["patches"]``, once, when it is created.
``patched(id)`` answers from that record, so one pipeline gets the same answer on every worker
and every attempt, whatever code runs it later. Once no live pipeline predates a patch, its
old branch can go: move the id to ``deprecated_patches``; ``patched`` then answers True, and a
worker refuses (leaves blocked) a live pipeline that predates it rather than run it down the
new branch. Keep the id listed there: it is how this code recognises pipelines that have it.

A record naming a patch that this code declares in neither list was created by newer code
(a rolling deploy: an old worker beside a new one): it is left blocked here too, so that it
never runs down the old branch, and a worker with the newer code takes it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prorch.model.exceptions import NotRegisteredError, RegistrationError, StepUsageError
from prorch.model.records import PipelineRecord

PATCHES = "patches"
"""The key of ``PipelineRecord.metadata`` that holds the patch ids a pipeline was created with."""


class PatchMismatchError(NotRegisteredError):
    """The pipeline's recorded patches do not fit this code (it is left blocked until they do)."""


def check_declared_patches(cls: Any) -> None:
    """Refuse, at registration, ``patches`` / ``deprecated_patches`` that are not lists of
    distinct non-empty strings, or an id in both."""
    seen: set[str] = set()
    for attribute in ("patches", "deprecated_patches"):
        value = getattr(cls, attribute, ())
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise RegistrationError(f'pipeline {cls.name}: {attribute} must be a list of ids, e.g. ["fix-rounding"]')
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise RegistrationError(f"pipeline {cls.name}: {attribute} holds {item!r}; an id is a non-empty str")
            if item in seen:
                raise RegistrationError(
                    f"pipeline {cls.name}: patch {item!r} is listed twice (in patches and deprecated_patches?); "
                    "a deprecated patch goes in deprecated_patches only"
                )
            seen.add(item)


def declared(cls: Any) -> frozenset[str]:
    """Every patch id the class knows: active and deprecated."""
    return frozenset(getattr(cls, "patches", ())) | frozenset(getattr(cls, "deprecated_patches", ()))


def recorded(record: PipelineRecord) -> frozenset[str]:
    """The patch ids the pipeline was created with (none for one created before patches existed)."""
    found = record.metadata.get(PATCHES)
    return frozenset(str(item) for item in found) if isinstance(found, list) else frozenset()


def to_record(cls: Any) -> list[str]:
    """What a new pipeline of ``cls`` records: every id it declares, sorted."""
    return sorted(declared(cls))


def is_patched(cls: Any, record: PipelineRecord, patch: str) -> bool:
    """``self.patched(patch)``: True when the pipeline was created with the patch (or the patch is
    deprecated: only such pipelines are run). An id the class does not declare is a mistake."""
    if patch not in declared(cls):
        known = ", ".join(sorted(declared(cls))) or "none"
        raise StepUsageError(
            f"patched({patch!r}): pipeline {cls.name} v{cls.version} declares no patch {patch!r} (declared: "
            f'{known}); add it to the class: patches = ["{patch}"]'
        )
    return patch in getattr(cls, "deprecated_patches", ()) or patch in recorded(record)


def mismatch(cls: Any, record: PipelineRecord) -> str | None:
    """Why this code must not run the pipeline because of its patches, or None: it predates a
    deprecated patch (the old branch is gone), or it has a patch this code does not declare
    (newer code created it)."""
    have = recorded(record)
    deprecated = getattr(cls, "deprecated_patches", ())
    if not have and not deprecated:  # most classes: every pipeline load comes here
        return None
    missing = _listed(id_ for id_ in deprecated if id_ not in have)
    if missing:
        return (
            f"this pipeline predates patch(es) {missing}, deprecated in this code (its old branch is gone); "
            "deploy code that still lists them in `patches` to finish it, or cancel it"
        )
    unknown = _listed(have - declared(cls))
    if unknown:
        return (
            f"this pipeline was created with patch(es) {unknown}, which this code does not declare (newer code "
            "created it); a worker whose code declares them runs it"
        )
    return None


def check(cls: Any, record: PipelineRecord) -> None:
    """Raise ``PatchMismatchError`` (the pipeline stays blocked) when ``mismatch`` finds a reason."""
    reason = mismatch(cls, record)
    if reason is not None:
        raise PatchMismatchError(reason, name=record.name)


def _listed(ids: Iterable[str]) -> str:
    return ", ".join(repr(id_) for id_ in sorted(ids))
