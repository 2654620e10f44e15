"""The watchdog's rule (cdl.liveness): a step past its deadline, or no progress outside a step,
makes the process not live and calls the hang action once, after the exit delay."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from cdl.liveness import LoopTracker, Stall, Watchdog


def test_a_step_past_its_deadline_is_a_stall_naming_the_step() -> None:
    t = LoopTracker("ingest", progress_deadline_s=100)
    now = time.monotonic()
    with t.step("send_offsets_to_transaction", 5):
        assert t.stalled(now + 4) is None
        stall = t.stalled(now + 6)
        assert stall is not None and stall.step == "send_offsets_to_transaction" and stall.loop == "ingest"
        assert "send_offsets_to_transaction for 6" in str(stall) and "deadline 5 s" in str(stall)
    assert t.stalled(now + 6) is None  # the step ended: that is progress


def test_no_progress_outside_a_step_is_a_stall_and_a_beat_resets_it() -> None:
    t = LoopTracker("job", progress_deadline_s=10)
    with t.step("consume", 1):
        pass
    now = time.monotonic()
    stall = t.stalled(now + 11)
    assert stall is not None and stall.step == "no progress since consume"
    t.beat()
    assert t.stalled(time.monotonic() + 9) is None


def test_an_open_step_within_its_deadline_is_not_judged_by_the_progress_deadline() -> None:
    t = LoopTracker("job", progress_deadline_s=1)
    with t.step("job ModelTrained", 3600):
        assert t.stalled(time.monotonic() + 60) is None


def test_steps_from_two_threads_are_tracked_apart() -> None:
    t = LoopTracker("loop", progress_deadline_s=100)
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with t.step("poll", 1):
            entered.set()
            release.wait(5)

    th = threading.Thread(target=other)
    th.start()
    assert entered.wait(5)
    with t.step("flush", 50):
        stall = t.stalled(time.monotonic() + 2)
        assert stall is not None and stall.step == "poll"
    release.set()
    th.join()
    assert t.stalled() is None


def test_the_watchdog_reports_not_live_then_acts_once_after_the_delay() -> None:
    acted: list[Stall] = []
    dog = Watchdog(on_hang=acted.append, exit_delay_s=2)
    t = dog.track("ingest", progress_deadline_s=100)
    assert dog.live()[0]
    now = time.monotonic()
    with t.step("commit_transaction", 1):
        assert dog.check(now + 0.5) is None
        stall = dog.check(now + 3)
        assert stall is not None and not acted
        live, details = dog.live()
        assert not live and "ingest: commit_transaction" in str(details["stuck"])
        dog.check(now + 4)
        assert not acted  # 1 s after it was found: still waiting the delay
        dog.check(now + 5.5)
        dog.check(now + 9)
    assert [s.step for s in acted] == ["commit_transaction"]  # once
    dog.untrack(t)
    assert "ingest" not in json.dumps(dog.live()[1]["loops"])


def test_healthz_serves_the_process_watchdog() -> None:
    """``/healthz`` is 200 with each loop's status, 503 naming the stuck step."""
    from cdl import liveness
    from cdl.observability import serve_http

    dog = liveness.WATCHDOG
    saved = dog.on_hang
    dog.on_hang = lambda stall: None
    http = serve_http(0)
    t = dog.track("test-loop", progress_deadline_s=100)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/healthz", timeout=5) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200 and body["status"] == "live" and "test-loop" in body["loops"]
        with t.step("init_transactions", 0.0):
            deadline = time.monotonic() + 10
            code = 200
            while code == 200 and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/healthz", timeout=5) as resp:
                        code = resp.status
                except urllib.error.HTTPError as exc:
                    code, body = exc.code, json.loads(exc.read())
            assert code == 503 and body["status"] == "not live" and "init_transactions" in body["stuck"]
        with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'cdl_loop_live{loop="test-loop"} 0.0' in text and "cdl_loop_progress_age_seconds" in text
    finally:
        dog.untrack(t)
        dog.stall, dog._acted = None, False  # this process's watchdog serves other tests after this one
        dog.on_hang = saved
        http.close()
