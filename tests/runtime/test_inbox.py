"""The SSE inbox: tokens gather between writes, the final event is never held back."""

from __future__ import annotations

import asyncio
import threading

from edgerunner.runtime.http.relay import Inbox
from edgerunner.runtime.protocol import DoneEvent, Event, TextEvent


def _from_worker(inbox: Inbox, events: list[Event]) -> None:
    """Put events from another thread, as the scheduler's worker does."""
    thread = threading.Thread(target=lambda: [inbox.put(e) for e in events])
    thread.start()
    thread.join()


def test_tokens_that_arrive_while_lingering_go_out_in_one_batch() -> None:
    async def scenario() -> list[Event]:
        inbox = Inbox(asyncio.get_running_loop())
        getter = asyncio.ensure_future(inbox.get(linger=1.0))
        await asyncio.sleep(0)  # the getter is lingering now
        _from_worker(inbox, [TextEvent("a")])
        # the loop runs in between: a reader without linger would return ["a"] here
        await asyncio.sleep(0.05)
        assert not getter.done()
        _from_worker(inbox, [TextEvent("b"), TextEvent("c")])
        return await getter

    assert asyncio.run(scenario()) == [TextEvent("a"), TextEvent("b"), TextEvent("c")]


def test_the_final_event_cuts_the_linger_short() -> None:
    done = DoneEvent("ab", "stop")

    async def scenario() -> list[Event]:
        inbox = Inbox(asyncio.get_running_loop())
        getter = asyncio.ensure_future(inbox.get(linger=600))
        await asyncio.sleep(0)
        _from_worker(inbox, [TextEvent("b"), done])
        # a held-back final would wait the full 600 s linger and trip this timeout
        return await asyncio.wait_for(getter, timeout=60)

    assert asyncio.run(scenario()) == [TextEvent("b"), done]


def test_a_waiting_reader_is_woken_by_the_first_token() -> None:
    async def scenario() -> list[Event]:
        inbox = Inbox(asyncio.get_running_loop())
        getter = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        _from_worker(inbox, [TextEvent("first")])
        return await asyncio.wait_for(getter, timeout=60)

    assert asyncio.run(scenario()) == [TextEvent("first")]


def test_a_stream_slower_than_the_linger_wakes_the_reader_once_per_token() -> None:
    linger = 0.01

    async def scenario() -> tuple[list[list[Event]], int]:
        inbox = Inbox(asyncio.get_running_loop())
        batches = []
        for k in range(5):
            getter = asyncio.ensure_future(inbox.get(linger=linger))
            await asyncio.sleep(20 * linger)  # tokens come further apart than the linger
            _from_worker(inbox, [TextEvent(str(k))])
            batches.append(await asyncio.wait_for(getter, timeout=60))
        return batches, inbox.wakeups

    batches, wakeups = asyncio.run(scenario())
    assert batches == [[TextEvent(str(k))] for k in range(5)]
    # the first gap costs its linger's timer as well; after that, only the tokens wake it
    assert wakeups == 5 + 1


def test_a_fast_stream_is_sent_once_per_linger() -> None:
    async def scenario() -> tuple[list[Event], int]:
        inbox = Inbox(asyncio.get_running_loop())
        getter = asyncio.ensure_future(inbox.get(linger=1.0))
        for k in range(4):
            await asyncio.sleep(0.01)
            _from_worker(inbox, [TextEvent(str(k))])
        return await asyncio.wait_for(getter, timeout=60), inbox.wakeups

    batch, wakeups = asyncio.run(scenario())
    assert batch == [TextEvent(str(k)) for k in range(4)]
    assert wakeups == 1  # its timer only: the tokens that came meanwhile did not wake it
