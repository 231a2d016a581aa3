"""``PipelineDefinition``: what a pipeline class declares (name, steps, version, priority,
``Params``) and how its params are checked. The registry holds these; ``prorch.Pipeline`` adds
creating, loading and running on top, so that the model does not depend on the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from prorch.model.exceptions import InvalidParamsError, UnstorableValueError
from prorch.model.jsonvalue import checked_copy
from prorch.model.records import JSONDict
from prorch.model.step import Step


class PipelineDefinition:
    """A pipeline's declaration. Subclass ``prorch.Pipeline``, not this: it is the part of a
    pipeline class that stored records are matched against."""

    name: ClassVar[str | None] = None
    steps: ClassVar[Sequence[type[Step]]] = ()
    version: ClassVar[int] = 1
    priority: ClassVar[int] = 0
    Params: ClassVar[type[BaseModel] | None] = None
    Output: ClassVar[type[BaseModel] | None] = None  # the result's model (default: the last step's output)
    # code evolution in place (prorch.model.patches): ids a new pipeline records; self.patched(id)
    patches: ClassVar[Sequence[str]] = ()
    deprecated_patches: ClassVar[Sequence[str]] = ()  # old branch gone: patched() is True, older ones blocked
    # limits kept by every worker's claim (prorch.model.limit_rules)
    max_running: ClassVar[int | None] = None  # at most this many of its pipelines leased at once, all workers
    max_running_per_tenant: ClassVar[int | None] = None  # at most this many of one tenant's
    rate_limit: ClassVar[str | None] = None  # "100/minute": at most that many hook calls started
    # a params field (or a function of the stored params) stored at create: what max_running_per_key counts by
    concurrency_key: ClassVar[str | Callable[[JSONDict], Any] | None] = None
    max_running_per_key: ClassVar[int | None] = None  # at most this many of one concurrency key value's
    fair: ClassVar[bool] = False  # claim its due pipelines from each key value (else tenant) in turn
    tenant_weights: ClassVar[Mapping[Any, float] | None] = None  # fair, with these turns per group (default 1)
    cancel_children: ClassVar[bool] = True  # cancelling this pipeline cancels its unended children
    # a recurring schedule (prorch.model.schedule_rules): a cron string or an interval, not both
    schedule: ClassVar[str | None] = None
    every: ClassVar[timedelta | None] = None
    schedule_tz: ClassVar[str] = "UTC"
    schedule_params: ClassVar[Any] = None  # a dict, or a function of the tick time returning params
    catch_up: ClassVar[str] = "latest"  # missed ticks: "latest", "all" or "none"
    schedule_grace: ClassVar[float | timedelta] = 60.0  # catch_up "none": seconds (or a timedelta) a tick may be late

    @classmethod
    def validate_params(cls, params: Any) -> JSONDict:
        """``params`` as stored: checked against ``Params`` (or as JSON values), never converted."""
        if cls.Params is not None:
            result: JSONDict = _validated_by_model(cls.name, cls.Params, params)
        elif params is None:
            return {}
        elif not isinstance(params, dict):
            raise InvalidParamsError(f"params for pipeline {cls.name} must be a dict, got {type(params).__name__}")
        else:
            result = params
        try:
            copied: JSONDict = checked_copy(result, "params")
        except UnstorableValueError as exc:
            raise InvalidParamsError(
                f"params for pipeline {cls.name} cannot be stored: {exc}; declare a Params pydantic model "
                "to accept richer types"
            ) from exc
        return copied

    @classmethod
    def merge(cls, old_params: JSONDict, new_params: JSONDict) -> Any:
        """Debounce (``create(key=..., debounce=...)``): the params of a pipeline still waiting
        in its window when another create lands in it, from its stored params and the new
        create's (both validated). The result is validated again. Default: the last wins."""
        return new_params


def _validated_by_model(name: str | None, model_cls: type[BaseModel], params: Any) -> JSONDict:
    if isinstance(params, dict) and model_cls.model_config.get("extra") in (None, "ignore"):
        known = set(model_cls.model_fields) | {f.alias for f in model_cls.model_fields.values() if f.alias}
        unknown = sorted(str(key) for key in params if key not in known)
        if unknown:
            raise InvalidParamsError(
                f"invalid params for pipeline {name}: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known)) or 'none'}); set model_config = "
                "ConfigDict(extra='allow') on Params to accept others"
            )
    try:
        model = params if isinstance(params, model_cls) else model_cls.model_validate(params or {})
    except RecursionError:
        raise InvalidParamsError(f"params for pipeline {name} are nested too deeply") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidParamsError(f"invalid params for pipeline {name}: {problems}") from exc
    dumped: JSONDict = model.model_dump(mode="json")
    return dumped
