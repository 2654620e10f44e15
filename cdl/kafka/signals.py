"""Stopping a loop after the current record, on request or on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from cdl.logging import get_logger

__all__: list[str] = []

log = get_logger(__name__)


class _Stoppable:
    """Stop after the current record, on request or on SIGTERM/SIGINT."""

    group_id: str
    _stop: threading.Event

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, frame: FrameType | None) -> None:
            log.info("stopping on signal", signal=signum, group=self.group_id)
            self.stop()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
