"""A stand-in engine rigged to fail on purpose, for the device loop's and the feeder's tests."""

from __future__ import annotations

from worker.engine.standin import StandInEngine, StandInPending


class RiggedEngine(StandInEngine):
    """Raises for a batch holding a row with prompt 'poison'; reports non-finite output for 'nan' rows."""

    def dispatch(self, rows, height, width, **kw):
        if any(r.prompt == "poison" for r in rows):
            raise FloatingPointError("poison row")
        pending = super().dispatch(rows, height, width, **kw)
        nan_rows = [r.prompt == "nan" for r in rows]

        class Pending(StandInPending):
            def fetch(self):
                out = super().fetch()
                out.finite = [not bad for bad in nan_rows]
                return out

        return Pending(pending.images, pending.rows, pending.done_at)
