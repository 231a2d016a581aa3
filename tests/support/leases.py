"""Taking a pipeline's lease from under the worker that holds it, as another worker's claim
would, from inside that worker's hook (the in-process lost-lease tests)."""

from __future__ import annotations

from prorch.model.records import PipelineRecord
from prorch.storage.store import Store


def take_lease(store: Store, uuid: str, owner: str = "another-worker") -> None:
    """Store ``owner`` as the lease holder of pipeline ``uuid``, claimed by the caller's worker."""
    record = store.get_pipeline(uuid)
    assert record is not None and record.lease_owner  # claimed by this worker
    claimed = {"lease_owner": owner, "revision": record.revision + 1}  # as another worker's claim
    store.repository(PipelineRecord.MODEL).update(uuid, claimed)
