"""The front's engines: which one each generation goes to, and where the calls about it must go.

Every engine has its own step loop, result board and tracker, so a request's ``result``, ``cancel`` and
``progress`` calls mean something only to the engine it was submitted to. The front therefore places each
generation itself when it submits it (on the engine with the fewest of this front's generations in flight; ties
go round in turn) and remembers the placement: every later call about that id goes to the same engine, and a
call about several ids is split by engine. Placement is decided in the front's single event loop, so concurrent
requests cannot race for it, and nothing depends on which worker a connection happens to reach.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from .generation import AudioRequest

# How long a released generation's placement is kept: a cancel sent while the request is being abandoned (the
# handler may be cancelled itself meanwhile) still finds the engine that holds it.
PLACEMENT_GRACE_S = 30.0
# How long a started engine may take to answer a call that does no work (its model card, its start-up report, the
# progress of its generations), however busy: its event loop runs apart from the step loop's thread. An engine
# still loading answers nothing.
QUICK_ANSWER_S = 4.0
# How much longer than it waits itself a submit (carrying an upload's audio, through the batching dispatcher) or a
# result call (which waits up to result_wait_s) may take before its engine counts as gone. A dead engine's socket
# still accepts connections (the supervisor holds it open), and a call on one would otherwise wait for the client's
# own timeout, 1.01 x traffic.timeout: every client and job of that engine hung for 15 minutes, the drain after them.
ENGINE_CALL_MARGIN_S = 30.0


class EnginePool:
    def __init__(self, engines: list[Any], result_wait_s: float):
        self.engines = engines  # BentoML clients of the engine services, in engine order
        self.result_wait_s = result_wait_s  # the longest one result call waits (ServiceSettings.result_wait_s)
        self._in_flight: dict[str, int] = {}  # generation id -> engine, from submit until release
        self._placement: dict[str, int] = {}  # the same, kept PLACEMENT_GRACE_S longer
        self._turn = 0

    async def describe(self) -> dict:
        """The model card; every engine must answer it within QUICK_ANSWER_S (else TimeoutError: one is loading its
        model, or hung), and all the same."""
        cards = await asyncio.wait_for(asyncio.gather(*(engine.to_async.describe() for engine in self.engines)),
                                       QUICK_ANSWER_S)
        if any(card != cards[0] for card in cards[1:]):
            raise RuntimeError(f"the engines serve different models: {[card['model'] for card in cards]}")
        return cards[0]

    def place(self, generation_id: str) -> int:
        """The engine of this generation: where it was placed, else the least busy one from now on."""
        if (index := self._placement.get(generation_id)) is None:
            load = Counter(self._in_flight.values())
            count = len(self.engines)
            index = min(range(count), key=lambda engine: (load[engine], (engine - self._turn) % count))
            self._turn = (index + 1) % count
            self._placement[generation_id] = self._in_flight[generation_id] = index
        return index

    def engine_of(self, generation_id: str) -> int | None:
        """The engine a generation was handed to; None before its submit."""
        return self._placement.get(generation_id)

    def release(self, generation_id: str) -> None:
        """The generation is over for the front: its engine stops counting it at once, forgets it a little later."""
        if self._in_flight.pop(generation_id, None) is not None:
            asyncio.get_running_loop().call_later(PLACEMENT_GRACE_S, self._placement.pop, generation_id, None)

    # Every call below raises TimeoutError past its bound: the engine is gone (see ENGINE_CALL_MARGIN_S).
    async def submit(self, request: AudioRequest) -> None:
        """Hands the request to its engine's step loop; a retried submit goes to the same engine, which ignores it."""
        await asyncio.wait_for(self.engines[self.place(request.id)].to_async.submit([request]), ENGINE_CALL_MARGIN_S)

    async def result(self, generation_id: str) -> dict | None:
        """The engine's result for this generation, or None if it has not come within ``result_wait_s``."""
        engine = self.engines[self._placement[generation_id]]
        answer = await asyncio.wait_for(engine.to_async.result(generation_id, self.result_wait_s),
                                        self.result_wait_s + ENGINE_CALL_MARGIN_S)
        return None if answer.get("pending") else answer

    async def cancel(self, generation_ids: list[str]) -> None:
        """Ids never submitted are skipped: no engine has them, and none will."""
        await asyncio.wait_for(asyncio.gather(*(self.engines[index].to_async.cancel(ids)
                                                for index, ids in self._by_engine(generation_ids).items())),
                               QUICK_ANSWER_S)

    async def progress(self, generation_ids: list[str]) -> dict[str, dict[str, int]]:
        """Steps done and total of the generations among these ids that have started, from their engines."""
        answers = await asyncio.wait_for(asyncio.gather(*(self.engines[index].to_async.progress(ids)
                                                          for index, ids in self._by_engine(generation_ids).items())),
                                         QUICK_ANSWER_S)
        return {generation_id: steps for answer in answers for generation_id, steps in answer.items()}

    def _by_engine(self, generation_ids: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for generation_id in generation_ids:
            if (index := self._placement.get(generation_id)) is not None:
                groups.setdefault(index, []).append(generation_id)
        return groups
