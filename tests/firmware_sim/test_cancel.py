"""cancel_until_done: a task that drops a cancellation (as wait_for can on 3.11) still ends."""

from __future__ import annotations

import asyncio

from firmware_sim.service import cancel_until_done


def test_a_task_that_drops_the_first_cancellation_is_cancelled_again() -> None:
    dropped: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if dropped:
                    raise
                dropped.append(1)  # what a wait_for that just completed does

    async def failing() -> None:
        raise ValueError("ended on its own")

    async def main() -> list[bool]:
        tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(cancel_until_done(tasks), 5)
        return [t.cancelled() for t in tasks]

    assert asyncio.run(main()) == [True, False]
    assert dropped == [1]


def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    async def main() -> bool:
        blocker = asyncio.create_task(asyncio.sleep(10))

        async def stopper() -> None:
            await cancel_until_done([blocker])

        outer = asyncio.create_task(stopper())
        await asyncio.sleep(0)
        outer.cancel()
        try:
            await outer
        except asyncio.CancelledError:
            return True
        finally:
            blocker.cancel()
        return False

    assert asyncio.run(main())
