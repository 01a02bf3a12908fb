"""How long input images live: while a job that names them does, then the worker's image sweep deletes them.

Each stored input records the ids of the jobs that name it (common/input_store.py). A job's record lives until
`job_ttl_s` after it ends; while it does, the job may run again (a retry, a dead worker's job sent again) or be
read, so its inputs stay. The sweep looks at the inputs whose time has come (a submit last named them more than
`input_grace_s` ago, or the sweep last found them in use that long ago), drops the ids whose record is gone, and
deletes an input left with none: its object, then its record, which gives its bytes back to the tenant's quota.
It runs in the image sweep's turn (worker/image_retention.py): one worker of the fleet an interval. A data set
run's lines name inputs by key: the API claims each for the run (common/input_store.run_claim), and the sweep keeps
that claim while the run's record lives.
"""

from __future__ import annotations

import logging
import time

from common import inputs
from common.dataset_store import DatasetStore
from common.input_store import RUN_CLAIM, InputStore
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
    runs: DatasetStore | None = None,
) -> dict:
    """One pass. Returns {"deleted": inputs deleted, "freed_bytes": their stored bytes, "kept": inputs still
    named by a live job or run (looked at again `grace_s` from now)}. Without `runs`, a run's claim is kept."""
    now = time.time() if now is None else now
    done = {"deleted": 0, "freed_bytes": 0, "kept": 0}
    while due := records.due(now, limit):  # each input looked at leaves the due ones (deleted, or put later)
        for tenant, digest in due:
            claims, ids = records.references(tenant, digest)
            gone = [claimant for claimant, alive in zip(ids, _alive(ids, jobs, runs), strict=True) if not alive]
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


def _alive(ids: list[str], jobs: JobStore, runs: DatasetStore | None) -> list[bool]:
    """Whether each claimant's record exists: a job's, or a run's for a run's claim."""
    job_ids = [i for i in ids if not i.startswith(RUN_CLAIM)]
    run_ids = [i.removeprefix(RUN_CLAIM) for i in ids if i.startswith(RUN_CLAIM)]
    found = dict(zip(job_ids, jobs.existing(job_ids), strict=True))
    run_alive = runs.existing(run_ids) if runs is not None else [True] * len(run_ids)
    found |= {RUN_CLAIM + run_id: alive for run_id, alive in zip(run_ids, run_alive, strict=True)}
    return [found[i] for i in ids]
