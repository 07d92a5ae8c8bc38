"""What else the machine did while a study cell trained: the load average at its start and
end, the cores other processes kept busy meanwhile, and the compiles that JAX's persistent
cache answered (their "compile" seconds are loading, not compiling)."""

import contextlib
import os
import time
from collections.abc import Iterator

from jax import monitoring

CACHE_HIT = "/jax/compilation_cache/cache_hits"
BUSY_OTHERS = 0.25  # cores kept busy by other processes above which a cell's seconds are marked


def _busy_seconds() -> float | None:
    """CPU seconds spent busy by all processes since boot (Linux `/proc/stat`), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def meter() -> Iterator[dict]:
    """Measure the block; the yielded dict is filled in when it ends:
    `loadavg_start`, `loadavg_end` (1-minute load averages), `other_cores` (the mean
    number of cores other processes kept busy, None where `/proc/stat` is unreadable),
    `busy` (whether that exceeds `BUSY_OTHERS`: the cell's seconds are not clean) and
    `cache_hits` (compiles loaded from JAX's persistent cache).

    **Example:**

    ```python
    with meter() as load:
        train_seeds(...)
    load["other_cores"]   # e.g. 0.02
    ```
    """
    record: dict = {"loadavg_start": os.getloadavg()[0]}
    hits = [0]

    def listen(event: str, **kwargs) -> None:
        del kwargs
        hits[0] += event == CACHE_HIT

    monitoring.register_event_listener(listen)
    tic, busy, own = time.perf_counter(), _busy_seconds(), _own_seconds()
    try:
        yield record
    finally:
        monitoring.unregister_event_listener(listen)
        wall, now = time.perf_counter() - tic, _busy_seconds()
        others = None
        if busy is not None and now is not None and wall > 0:
            others = max(0.0, ((now - busy) - (_own_seconds() - own)) / wall)
        record.update(
            loadavg_end=os.getloadavg()[0],
            other_cores=others,
            busy=others is not None and others > BUSY_OTHERS,
            cache_hits=hits[0],
        )
