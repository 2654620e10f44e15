"""Memory trimming: the heap's free pages handed back to the kernel, once a minute or as soon as they pile up.

Owns when the last trim was and how much was resident after it. The heap keeps what it
faulted in (``cdl.memory.keep_freed_memory``): that pays at full speed, but on a long run its
free pages would only pile up, so every flush asks :meth:`Trimmer.maybe_trim`.
"""

from __future__ import annotations

import time

from cdl.memory import release_memory, resident_bytes

__all__ = ["TRIM_GROWTH_BYTES", "TRIM_INTERVAL_S", "TRIM_MIN_S", "Trimmer"]

#: seconds between two hand-backs of the heap's free memory to the kernel (cdl.service.release_memory)
TRIM_INTERVAL_S = 60.0
#: ... or sooner (but not within TRIM_MIN_S of the last), at a flush, once resident memory is this
#: much above what it was after the last one
TRIM_GROWTH_BYTES = 8 << 20
TRIM_MIN_S = 5.0


class Trimmer:
    """When the heap's free pages were last handed back, and the resident memory after that."""

    def __init__(self) -> None:
        self._trimmed_at = time.monotonic()
        self._trimmed_rss = resident_bytes() or 0

    def maybe_trim(self) -> None:
        """Hand the heap's free pages back once a minute, or as soon as they pile up.

        The heap keeps what it faulted in (keep_freed_memory): that pays at full speed, but
        on a long run its free pages would only pile up. On a clock alone resident memory
        swung by ~50 MiB within each minute (bench/soak read 100 or 150 MiB depending on
        when it looked); trimming also when it is ``TRIM_GROWTH_BYTES`` above its level after
        the last trim bounds the swing at the cost of some page faults (at most one trim every ``TRIM_MIN_S``).
        """
        rss = resident_bytes() or 0
        now = time.monotonic()
        since = now - self._trimmed_at
        if since >= TRIM_INTERVAL_S or (since >= TRIM_MIN_S and rss - self._trimmed_rss >= TRIM_GROWTH_BYTES):
            release_memory()
            self._trimmed_at = time.monotonic()
            self._trimmed_rss = resident_bytes() or 0
