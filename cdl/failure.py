"""The one failure policy of cdl's loops: what to do when work fails, and how long to wait.

Every loop (:class:`~cdl.kafka.TransactionalLoop`, :class:`~cdl.kafka.JobLoop`)
classifies a failure with :meth:`FailurePolicy.verdict` and waits
:meth:`FailurePolicy.delay` between tries, so retries, backoff, attempt counts
and dead-letter reasons are defined here and nowhere else:

- a :class:`~cdl.errors.PermanentError` (the input breaks a rule, it can never
  succeed) is dead-lettered at once, reason ``permanent failure``;
- an :class:`~cdl.errors.UnavailableError` (a dependency — broker, object
  store, model server — cannot be reached) is retried for as long as it lasts,
  with capped exponential backoff: an outage never dead-letters anything;
- anything else (another retryable error, or a bug) is retried up to
  ``max_attempts`` tries, then dead-lettered with reason ``retries exhausted``.

Loops that cannot make progress at all (a transaction that keeps failing, a
consumer whose group membership is gone) start a new session in place, with
the same backoff; see docs/reliability.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from cdl.errors import CdlError, UnavailableError

__all__ = ["DEFAULT_POLICY", "DeadLetterReason", "FailurePolicy", "Verdict"]


class DeadLetterReason(StrEnum):
    """Why a loop dead-lettered an event (the start of its ``cdl-reason`` header)."""

    UNDECODABLE = "undecodable"
    PERMANENT = "permanent failure"
    EXHAUSTED = "retries exhausted"


class Verdict(Enum):
    """What to do after a failed try."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class FailurePolicy:
    """Attempts and backoff shared by every loop."""

    max_attempts: int = 4
    """Tries of one piece of work before it is dead-lettered (outages excepted: those wait)."""
    backoff_s: float = 0.5
    """Wait after the first failed try; doubles with every further one."""
    max_backoff_s: float = 30.0
    """Longest wait between two tries."""
    transaction_retry_s: float = 60.0
    """How long a transaction is retried in place before its loop starts a new session."""
    call_grace_s: float = 30.0
    """How long a blocking Kafka call may run past the timeout it was given before its loop counts
    as stuck (the process reports not live and exits for its supervisor; cdl.liveness)."""
    progress_deadline_s: float = 180.0
    """Longest a loop may go without progress (a poll returned, a transaction or step finished)
    outside a blocking call before it counts as stuck."""
    job_deadline_s: float = 6 * 3600.0
    """Longest one job (a training, a study, a compression) may run before its loop counts as stuck."""
    restore_deadline_s: float = 3600.0
    """Longest a loop's state restore at the start of a session may take (ingest reads its snapshot
    and the manifests of every dataset) before the loop counts as stuck."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1)))

    def verdict(self, exc: BaseException, attempt: int) -> tuple[Verdict, DeadLetterReason | None]:
        """Retry or dead-letter after try number ``attempt`` failed with ``exc``."""
        if isinstance(exc, CdlError) and not exc.retryable:
            return Verdict.DEAD_LETTER, DeadLetterReason.PERMANENT
        if isinstance(exc, UnavailableError):
            return Verdict.RETRY, None
        if attempt < self.max_attempts:
            return Verdict.RETRY, None
        return Verdict.DEAD_LETTER, DeadLetterReason.EXHAUSTED


DEFAULT_POLICY = FailurePolicy()
