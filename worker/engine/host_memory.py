"""How much host memory a model's weights need while they are read, and how much the host has.

A start that reads more than the host can hold is not refused by anything else: the kernel's OOM killer ends
the process mid-read, with no log line (issue 30: SDXL in float32 on a 23 GB host). So the loader compares the
two before reading (model.assemble) and refuses with a message that names both and the dtype.

Needed (streamed, LoadOptions(background=True), as the worker loads): the weights are converted, placed and let
go a group at a time (model_source.GROUP_BYTES), so the host holds the served weights if it serves them (a CPU,
whose device memory is the host's) plus a few groups in flight: the checkpoint's pages, the converted copy, the
devices' copy being made. A load read whole (the tests, the refiner) holds the converted tree and then the
devices' copy: twice the weights on a CPU. Compiling the programs needs more on top (XLA's own memory), which
this does not count.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

IN_FLIGHT_GROUPS = 3  # the checkpoint's pages, the converted copy, the devices' copy, of the group in flight
CGROUP = Path("/sys/fs/cgroup")


def needed_bytes(served_bytes: int, resident_on_host: bool, group_bytes: int, streamed: bool) -> int:
    """The host memory a load needs at its peak, from the served weights' bytes (see the module docstring)."""
    if streamed:
        return (served_bytes if resident_on_host else 0) + IN_FLIGHT_GROUPS * group_bytes
    return served_bytes * (2 if resident_on_host else 1)


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = CGROUP) -> int:
    """What the kernel says can be allocated without swapping: MemAvailable (free memory and the page cache it
    can drop, the checkpoint's cached pages included), or less where this process's cgroup (a container's
    memory limit) leaves less. /proc/meminfo shows the whole host's memory inside a container too."""
    found = [_meminfo_available(meminfo)]
    found.append(_cgroup_left(cgroup / "memory.max", cgroup / "memory.current", cgroup / "memory.stat"))  # v2
    v1 = cgroup / "memory"
    found.append(_cgroup_left(v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat"))
    return min(n for n in found if n is not None)


def _meminfo_available(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no MemAvailable line")


def _cgroup_left(limit: Path, usage: Path, stat: Path) -> int | None:
    """The limit less the usage, the usage less the page cache the cgroup can drop (inactive_file)."""
    try:
        text = limit.read_text().strip()
        if text == "max" or int(text) >= 2**60:  # no limit (v1 writes a huge number for none)
            return None
        used = int(usage.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        fields = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
        used -= int(fields.get("inactive_file", fields.get("total_inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return max(0, int(text) - used)


def trim() -> None:
    """Hand the C heap's free memory back to the kernel (glibc's malloc_trim). Arrays under 32 MB come from the
    heap, and glibc keeps what they freed: after SDXL's weights pass through a group at a time, about a GB that
    nothing uses would otherwise stay resident for the life of the worker. Elsewhere (musl, macOS): nothing."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
