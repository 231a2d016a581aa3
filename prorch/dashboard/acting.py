"""What the dashboard's actions do, for its forms and its JSON API alike: cancel, retry, rerun,
send, pause and resume on one pipeline, and bulk actions on every pipeline a listing's filters match. Each
reads its fields (strings from a form, JSON values from the API), refuses bad ones with one
error before anything is written, and records who acted and why."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prorch.bulk import ACTIONS as BULK_ACTIONS
from prorch.bulk import BulkAction, BulkSummary, Filters
from prorch.dashboard import views
from prorch.model.exceptions import InvalidMessageError, InvalidParamsError, InvalidStateError
from prorch.model.pauses import CLASS, TENANT, Pause, tenant_text
from prorch.model.status import Status
from prorch.orchestrator import Orchestrator
from prorch.storage import forking
from prorch.storage.listing import parse_age
from prorch.storage.outside import NO_PAYLOAD

ACTIONS = ("cancel", "retry", "rerun", "send", "pause", "pause-class", "pause-tenant", "resume")
CONFIRMED = ("cancel", "retry", "rerun", "pause", "pause-class", "pause-tenant", "resume")
"""The actions the pages ask to confirm (a message is sent at once)."""
YES = ("1", "on", "yes", "true")
NO = ("", "0", "off", "no", "false")


@dataclass(frozen=True)
class Done:
    """What an action did, to tell the user, and the pipeline to show next (a rerun's new one)."""

    message: str
    uuid: str


def act(orchestrator: Orchestrator, uuid: str, action: str, fields: Mapping[str, Any], actor: str) -> Done:
    """Run one action on pipeline ``uuid``."""
    if action not in ACTIONS:
        raise InvalidParamsError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    reason = reason_of(fields)
    if action == "cancel":
        state = orchestrator.cancel(uuid, actor=actor, reason=reason)
        return Done("cancelled" if state.pipeline.status == Status.CANCELLED else "cancel requested", uuid)
    if action == "retry":
        orchestrator.retry(uuid, actor=actor, reason=reason)
        return Done("retrying", uuid)
    if action == "pause":
        orchestrator.pause(uuid=uuid, actor=actor, reason=reason)
        return Done("paused", uuid)
    if action == "pause-class":
        name = orchestrator.get(uuid).pipeline.name
        orchestrator.pause(name=name, actor=actor, reason=reason)
        return Done(f"paused class {name}", uuid)
    if action == "pause-tenant":
        tenant = tenant_of(orchestrator, uuid)
        orchestrator.pause(tenant=tenant, actor=actor, reason=reason)
        return Done(f"paused tenant {tenant}", uuid)
    if action == "resume":
        return Done(f"resumed {resume_holding(orchestrator, uuid, actor, reason).label()}", uuid)
    if action == "rerun":
        step, params, cancel_original = rerun_fields(fields)
        new = orchestrator.rerun(uuid, step, params, cancel_original=cancel_original, actor=actor, reason=reason)
        return Done(f"rerun of {uuid} from {step}", new.pipeline.uuid)
    return send(orchestrator, uuid, fields)


def tenant_of(orchestrator: Orchestrator, uuid: str) -> str:
    """The tenant of pipeline ``uuid``, as text (a tenant's pause matches it as text); refused
    when no tenant's pause could hold it (none, or not a text or an integer)."""
    tenant = tenant_text(orchestrator.get(uuid).pipeline.context)
    if tenant is None or tenant == "":
        raise InvalidStateError(
            f"pipeline {uuid} has no tenant a pause can hold (a text or an integer): pause it, or its class, instead"
        )
    return tenant


def resume_holding(orchestrator: Orchestrator, uuid: str, actor: str, reason: str | None) -> Pause:
    """End the pause that holds the pipeline, whatever its scope (itself, its class, its tenant)."""
    pause = orchestrator.holds().pause_of(orchestrator.get(uuid).pipeline)
    if pause is None:
        raise InvalidStateError(f"pipeline {uuid} is not paused: nothing to resume")
    scope = {"name": pause.value} if pause.kind == CLASS else {"tenant": pause.value} if pause.kind == TENANT else {
        "uuid": pause.value}  # fmt: skip
    return orchestrator.resume(**scope, version=pause.version, actor=actor, reason=reason)


def send(orchestrator: Orchestrator, uuid: str, fields: Mapping[str, Any]) -> Done:
    name, payload = fields.get("name"), fields.get("payload")
    if not name:
        raise InvalidMessageError("a message needs a name")
    try:
        value = json.loads(payload) if payload not in (None, "") else NO_PAYLOAD
    except json.JSONDecodeError as exc:
        raise InvalidMessageError(f"the payload is not valid JSON: {exc}") from exc
    orchestrator.send(uuid, str(name), value)
    return Done(f"sent {name}", uuid)


def check_rerun(orchestrator: Orchestrator, uuid: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A rerun's arguments, checked as the rerun will check them, with nothing stored: what
    the confirm step shows (the step, the params the new pipeline will have, the steps reused)."""
    step, params, cancel_original = rerun_fields(fields)
    reason_of(fields)
    record = orchestrator.get(uuid).pipeline
    plan = forking.plan_rerun(record, orchestrator.store.steps_of(uuid), step, registry=orchestrator.registry,
                              params=params)  # fmt: skip
    live = record.status.value not in ("finished", "failed", "cancelled")
    if live and not cancel_original:
        raise InvalidParamsError(
            f"pipeline {uuid} is {record.status.value}, still running: tick 'cancel the original' to cancel it first"
        )
    return {"from_step": step, "params": plan.params, "reused": [s.name for s in plan.reused],
            "cancel_original": cancel_original and live}  # fmt: skip


def rerun_fields(fields: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """The step, the params to change (None: the original's), and whether to cancel the original."""
    step = fields.get("from_step")
    if not isinstance(step, str) or not step.strip():
        raise InvalidParamsError('a rerun needs from_step: the name of the step to run again, e.g. "Transform"')
    params = fields.get("params")
    if isinstance(params, str):
        params = _json(params, "params") if params.strip() else None
    if params is not None and not isinstance(params, dict):
        raise InvalidParamsError(f'params must be a JSON object of the fields to change, e.g. {{"n": 2}}, '
                                 f"got {type(params).__name__}")  # fmt: skip
    return step.strip(), params, flag(fields.get("cancel_original"), "cancel_original")


def reason_of(fields: Mapping[str, Any]) -> str | None:
    reason = fields.get("reason")
    if reason is None or (isinstance(reason, str) and not reason.strip()):
        return None
    if not isinstance(reason, str):
        raise InvalidParamsError(f"reason must be a text, got {type(reason).__name__}")
    return reason


def flag(value: Any, name: str) -> bool:
    """A checkbox's value from a form (absent: False), or a JSON boolean."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (*YES, *NO):
        return value.strip().lower() in YES
    raise InvalidParamsError(f"{name} must be true or false, got {json.dumps(value)}")


@dataclass(frozen=True)
class BulkRequest:
    action: BulkAction
    filters: Filters
    given: dict[str, str]  # the filters as typed, to show and to send again with the confirmation


def bulk_request(fields: Mapping[str, Any], filters: Any, now: datetime, actor: str) -> BulkRequest:
    """A bulk action and its filters (those of the listing: ``status``, ``name``, ...), checked."""
    if not isinstance(filters, Mapping):
        raise InvalidParamsError('filters must be a JSON object of the listing\'s filters, e.g. {"status": "failed"}')
    allowed = views.LISTED
    unknown = sorted(set(filters) - set(allowed) - {"limit", "after"})
    if unknown:
        raise InvalidParamsError(f"unknown filter {', '.join(unknown)}: use {', '.join(allowed)}")
    given = {name: str(filters[name]).strip() for name in allowed if str(filters.get(name) or "").strip()}
    chosen = views.bulk_filters(given, now)
    if not chosen.given():
        raise InvalidParamsError("give at least one filter (e.g. status=failed): a bulk action on every pipeline is "
                                 "not offered here (use the CLI)")  # fmt: skip
    name = fields.get("action")
    if name not in BULK_ACTIONS:
        raise InvalidParamsError(f"bulk action {name!r}: use one of {', '.join(BULK_ACTIONS)}")
    action = BulkAction(str(name), actor=actor, reason=reason_of(fields), **_bulk_options(str(name), fields))
    action.check()
    return BulkRequest(action, chosen, given)


def _bulk_options(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    if name == "rerun":
        step, params, cancel_original = rerun_fields(fields)
        return {"from_step": step, "params": params, "cancel_original": cancel_original}
    if name == "purge":
        older = fields.get("older_than")
        return {"older_than": parse_age(str(older), "older_than") if older not in (None, "") else timedelta(0)}
    return {}


def summary_json(summary: BulkSummary) -> dict[str, Any]:
    return {
        "action": summary.action, "dry_run": summary.dry_run, "matched": summary.matched, "done": summary.done,
        "skipped": summary.skipped, "failed": summary.failed, "skipped_why": dict(summary.skipped_why),
        "errors": summary.errors, "created": summary.created,
    }  # fmt: skip


def _json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParamsError(f'{name} is not valid JSON ({exc}): give a JSON object, e.g. {{"n": 2}}') from exc
