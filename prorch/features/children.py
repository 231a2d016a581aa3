"""Children as an extension: when a pipeline ends in this process, wake its parent with a
``CHILD_ENDED`` message (its ``child_result`` consumes it; ``receive(CHILD_ENDED)`` reads it),
and cancel its unended children if it was cancelled (``cancel_children``, default on), and
theirs, to any depth: a list of pipelines to tell, not a recursion. A failure here is logged:
the parent's own wait, or a later cancel, still gets there."""

from __future__ import annotations

import logging

from prorch.engine.extension import Extension, Host
from prorch.model.exceptions import ProrchError
from prorch.model.records import PipelineRecord
from prorch.model.status import TERMINAL, Status
from prorch.storage import outside
from prorch.storage.results import CHILD_ENDED

logger = logging.getLogger("prorch.features.children")


class Children(Extension):
    """Tells parents that a child ended, and cascades a cancel to the children."""

    def setup(self, host: Host) -> None:
        self.host = host

    def on_ended(self, pipeline: PipelineRecord, status: Status) -> None:
        ended = [(pipeline, status)]
        while ended:
            record, how = ended.pop()
            try:
                children = self._tell_parent(record, how)
            except ProrchError as exc:
                _tell_failed(record, how, exc)
                continue
            if not children or not self._cancels_children(record):
                continue
            for child in children:
                try:
                    cancelled = self.host.cancel_here(child.uuid) if child.status not in TERMINAL else None
                except ProrchError as exc:
                    _tell_failed(record, how, exc)
                    continue
                if cancelled is not None:
                    ended.append((cancelled, Status.CANCELLED))

    def _tell_parent(self, record: PipelineRecord, status: Status) -> list[PipelineRecord]:
        """Send the parent its message; the children to cancel, when ``record`` was cancelled."""
        store, clock = self.host.store, self.host.clock
        parent = store.get_pipeline(record.parent_uuid) if record.parent_uuid else None
        if parent is not None and parent.status not in TERMINAL:
            outside.send(store, clock, parent.uuid, CHILD_ENDED, {"child": record.uuid, "status": status.value})
        return store.children_of(record.uuid) if status == Status.CANCELLED else []

    def _cancels_children(self, record: PipelineRecord) -> bool:
        try:
            return bool(self.host.registry.pipeline(record.name, record.version).cancel_children)
        except ProrchError:
            return True


def _tell_failed(record: PipelineRecord, status: Status, exc: ProrchError) -> None:
    logger.warning("pipeline %s ended %s; telling its parent or children failed: %s", record.uuid,
                   status.value, exc, extra={"pipeline_uuid": record.uuid})  # fmt: skip
