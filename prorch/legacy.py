"""prorch 1.0.1 import paths, kept so that code written for it runs unchanged.

prorch 1.0.1 spread its API over nine sub-packages (``prorch.pipeline.pipeline``,
``prorch.step.step`` ...). Today they live in the layer packages (``prorch.model`` ...); this
module maps each old dotted path to the module that now holds those names, by registering it in
``sys.modules`` when ``prorch`` is imported. New code should use ``from prorch import ...``.
"""

from __future__ import annotations

import sys
import types

from prorch import orchestrator, pipeline
from prorch.model import exceptions, mixins, records, registry, status, step
from prorch.storage import repository

#: old dotted path -> names it exported, and where those names live now.
LEGACY_MODULES: dict[str, dict[str, object]] = {
    "prorch.pipeline.pipeline": {"Pipeline": pipeline.Pipeline},
    "prorch.step.step": {"Step": step.Step},
    "prorch.mixins.on_start": {"OnStartMixin": mixins.OnStartMixin},
    "prorch.mixins.on_continue": {"OnContinueMixin": mixins.OnContinueMixin},
    "prorch.decorators.decorators": {
        "register_pipeline": registry.register_pipeline,
        "register_step": registry.register_step,
    },
    "prorch.dataclasses.orchestrator": {
        "OrchestratorConfig": orchestrator.OrchestratorConfig,
        "SavedItem": repository.SavedItem,
    },
    "prorch.interfaces.repository": {"IRepository": repository.IRepository},
    "prorch.utils.constants": {"Metadata": records.Metadata, "Status": status.Status},
    "prorch.exceptions.exceptions": {
        name: getattr(exceptions, name)
        for name in (
            "StepsNotDefinedException",
            "PipelineNameNotDefinedException",
            "RepositoryNotDefinedException",
            "StepNameNotDefinedException",
            "PipelineNotDefinedException",
        )
    },
}


#: 1.0.1 parents that were flat modules of their own until #26 moved them into ``prorch.model``:
#: ``from prorch.step import Step`` still finds the module beside ``prorch.step.step``.
LEGACY_PARENTS: dict[str, types.ModuleType] = {"prorch.step": step, "prorch.mixins": mixins}


def install() -> None:
    """Register the old module paths (and their missing parent packages) in ``sys.modules``."""
    for dotted, module in LEGACY_PARENTS.items():
        sys.modules.setdefault(dotted, module)
    for dotted, names in LEGACY_MODULES.items():
        if dotted in sys.modules:
            continue
        module = types.ModuleType(dotted, f"prorch 1.0.1 compatibility module; see {__name__}")
        module.__dict__.update(names, __all__=list(names))
        sys.modules[dotted] = module
        child: types.ModuleType = module
        parent_name, _, child_name = dotted.rpartition(".")
        while parent_name:
            parent = sys.modules.get(parent_name)
            created = parent is None
            if parent is None:
                parent = types.ModuleType(parent_name, "prorch 1.0.1 compatibility package")
                parent.__path__ = []
                sys.modules[parent_name] = parent
            if not hasattr(parent, child_name):
                setattr(parent, child_name, child)
            if not created:
                break
            child = parent
            parent_name, _, child_name = parent_name.rpartition(".")
