"""The drain and stop rules without Ray: DrainState's accounting, the supervisor's signal
forwarding, the edge limits' validation, the 503s' headers."""

from __future__ import annotations

import signal
import threading

import pytest

from ageray.serving.drain import DrainReport, DrainState, draining_error
from ageray.serving.lifecycle import Forwarder
from ageray.serving.settings import Limits


def test_drain_state_counts_and_refuses() -> None:
    state = DrainState()
    assert state.enter() and state.enter() and state.inflight == 2
    assert not state.idle()
    assert state.start() and not state.start()  # once
    assert not state.enter() and state.refused == 1  # new requests refused
    state.leave()
    assert not state.idle()
    state.leave()
    assert state.idle() and state.inflight == 0
    state.leave()  # never negative
    assert state.inflight == 0


def test_drain_state_is_thread_safe() -> None:
    state = DrainState()

    def work() -> None:
        for _ in range(1000):
            assert state.enter()
            state.leave()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.inflight == 0


def test_draining_error_says_retry_and_close() -> None:
    err = draining_error(2)
    assert err.status == 503 and err.code == "shutting_down"
    assert err.headers == {"Retry-After": "2", "Connection": "close"}


def test_forwarder_first_drains_second_hurries_then_ignores() -> None:
    sent: list[int] = []
    forward = Forwarder(sent.append)
    forward(signal.SIGINT)
    assert sent == [signal.SIGTERM]
    forward(signal.SIGTERM)
    assert sent == [signal.SIGTERM, signal.SIGINT]
    forward(signal.SIGTERM)
    assert sent == [signal.SIGTERM, signal.SIGINT]


def test_drain_report_line() -> None:
    assert "no edge guard" in DrainReport(proxies=0).line()
    assert "drained" in DrainReport(proxies=1, seconds=0.4).line()
    assert "timed out" in DrainReport(proxies=1, drained=False, left={"p": 2}).line()


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout_s": 0},
        {"admission_timeout_s": -1},
        {"max_connections_per_client": -1},
        {"max_url_bytes": 0},
    ],
)
def test_edge_limits_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Limits.from_mapping(bad)
