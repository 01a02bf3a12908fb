"""How long input images live: while a job that names them does, then the worker's image sweep deletes them.

Each stored input records the ids of the jobs that name it (common/input_store.py). A job's record lives until
`job_ttl_s` after it ends; while it does, the job may run again (a retry, a dead worker's job sent again) or be
read, so its inputs stay. The sweep looks at the inputs whose time has come (a submit last named them more than
`input_grace_s` ago, or the sweep last found them in use that long ago), drops the ids whose record is gone, and
deletes an input left with none: its object, then its record, which gives its bytes back to the tenant's quota.
It runs in the image sweep's turn (worker/image_retention.py): one worker of the fleet an interval.
"""

from __future__ import annotations

import logging
import time

from common import inputs
from common.input_store import InputStore
from common.job_store import JobStore
from common.storage import Storage

log = logging.getLogger(__name__)
PAGE_INPUTS = 1000  # inputs read from the index at once; a pass goes on until none is due


def sweep(
    storage: Storage,
    records: InputStore,
    jobs: JobStore,
    grace_s: float,
    now: float | None = None,
    limit: int = PAGE_INPUTS,
) -> dict:
    """One pass. Returns {"deleted": inputs deleted, "freed_bytes": their stored bytes, "kept": inputs still
    named by a live job (looked at again `grace_s` from now)}."""
    now = time.time() if now is None else now
    done = {"deleted": 0, "freed_bytes": 0, "kept": 0}
    while due := records.due(now, limit):  # each input looked at leaves the due ones (deleted, or put later)
        for tenant, digest in due:
            claims, ids = records.references(tenant, digest)
            gone = [job_id for job_id, alive in zip(ids, jobs.existing(ids), strict=True) if not alive]
            verdict = records.retire(tenant, digest, claims, gone, now + grace_s, now)
            if verdict == "kept":
                done["kept"] += 1
            elif verdict == "delete":
                # delete, not delete_many: a local folder's emptied parents stay, for a submit writing beside it
                storage.delete(inputs.key(tenant, digest))
                done["freed_bytes"] += records.forget(tenant, digest)
                done["deleted"] += 1
    if done["deleted"]:
        log.info("input sweep: %s", done)
    return done
