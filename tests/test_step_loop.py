"""The step loop in-process: requests joining and leaving at any step never change anyone's audio; caps, first come
first served, whole-batch mode, the loop thread and the result board."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from stable_audio_bento import tracking
from stable_audio_bento.generation import AudioRequest, AudioResult, GenerationMonitor
from stable_audio_bento.step_loop import LoopLimits, StepLoop, run_to_completion
from stable_audio_bento.tracking import RequestTracker, ResultBoard

REQUESTS = [
    AudioRequest("a long drone", seed=1, audio_length=6.0, num_inference_steps=9, id="long"),
    AudioRequest("a piano melody", seed=2, audio_length=3.0, negative_prompt="noise, distortion",
                 guidance_scale=4.0, num_inference_steps=5, id="negative"),
    AudioRequest("rain on a roof", seed=3, audio_length=2.0, audio_start=5.0, guidance_scale=1.0,
                 num_inference_steps=4, id="unguided"),
    AudioRequest("a click", seed=4, audio_length=1.0, num_inference_steps=2, id="short"),
]
BY_ID = {request.id: request for request in REQUESTS}


@pytest.fixture(scope="module")
def alone(engine) -> dict[str, np.ndarray]:
    return {request.id: run_to_completion(engine, [request])[0].audio for request in REQUESTS}


class Drive:
    """Runs a loop turn by turn, submitting requests before the turns the schedule names."""

    def __init__(self, engine, monitor: GenerationMonitor = GenerationMonitor(), limits: LoopLimits = LoopLimits()):
        self.loop = StepLoop(engine, monitor, limits)
        self.results: dict[str, AudioResult] = {}
        self.finished_order: list[str] = []
        self.turns: list[set[str]] = []  # the ids that took a step in each turn
        self.rows_per_forward: list[int] = []
        forward = engine.forward

        def spied(states):
            self.turns[-1].update(state.request.id for state in states)
            self.rows_per_forward.append(sum(state.request.rows for state in states))
            return forward(states)

        self.spied_forward = spied

    def run(self, monkeypatch, schedule: dict[int, list[str]], between=lambda turn: None) -> dict[str, AudioResult]:
        monkeypatch.setattr(self.loop.family, "forward", self.spied_forward)
        turn = 0
        while turn <= max(schedule) or self.loop.busy:
            for request_id in schedule.get(turn, []):
                self.loop.submit(BY_ID[request_id], lambda result, request_id=request_id: self.deliver(request_id, result))
            self.turns.append(set())
            self.loop.step()
            between(turn)
            turn += 1
        return self.results

    def deliver(self, request_id: str, result: AudioResult) -> None:
        self.results[request_id] = result
        self.finished_order.append(request_id)

    def first_turn(self, request_id: str) -> int:
        return next(turn for turn, ids in enumerate(self.turns) if request_id in ids)

    def last_turn(self, request_id: str) -> int:
        return max(turn for turn, ids in enumerate(self.turns) if request_id in ids)


def assert_exact(results: dict[str, AudioResult], alone: dict[str, np.ndarray], ids) -> None:
    for request_id in ids:
        result = results[request_id]
        assert result.error is None, (request_id, result.error)
        assert np.array_equal(result.audio, alone[request_id]), request_id


@pytest.mark.parametrize("join_at", [1, 3, 6])
def test_requests_joining_a_running_loop_at_any_step_get_their_solo_audio(engine, alone, monkeypatch, join_at):
    drive = Drive(engine)
    results = drive.run(monkeypatch, {0: ["long"], join_at: ["negative", "short"], join_at + 1: ["unguided"]})
    assert_exact(results, alone, BY_ID)
    assert drive.first_turn("negative") == drive.first_turn("short") == join_at  # admitted at the next step
    assert drive.first_turn("unguided") == join_at + 1
    assert results["short"].batch_size >= 2 and "long" in drive.turns[join_at]  # it really shared steps
    assert drive.finished_order.index("short") < drive.finished_order.index("long")  # and did not wait for it
    assert results["long"].timings["prepare_s"] >= 0 and results["short"].started_at >= results["long"].started_at


def test_a_monitor_that_fails_on_a_result_does_not_cost_the_request_its_audio(engine, alone, monkeypatch):
    class BrokenMetrics(GenerationMonitor):
        def on_finish(self, request, result):
            raise RuntimeError("a metrics backend fault")

    results = Drive(engine, BrokenMetrics()).run(monkeypatch, {0: ["short", "unguided"]})
    assert_exact(results, alone, ["short", "unguided"])


class FailingFor(GenerationMonitor):
    """A monitor whose ``hook`` raises for the request ``victim`` (for every request where the hook names none)."""

    def __init__(self, hook: str, victim: str):
        self.hook, self.victim = hook, victim

    def maybe_fail(self, hook: str, request: AudioRequest | None = None) -> None:
        if hook == self.hook and (request is None or request.id == self.victim):
            raise RuntimeError(f"{hook} broke")

    def interruption(self, request):
        self.maybe_fail("interruption", request)

    def on_step(self, request, steps_done, steps_total):
        self.maybe_fail("on_step", request)

    def on_forward(self, requests, rows, seconds):
        self.maybe_fail("on_forward")

    def on_work(self, seconds):
        self.maybe_fail("on_work")


@pytest.mark.parametrize("hook, victim_fails", [("interruption", True), ("forward_key", True), ("on_step", False),
                                                 ("on_forward", False), ("on_work", False)])
def test_a_hook_that_raises_for_one_request_costs_at_most_that_request(engine, alone, monkeypatch, hook,
                                                                      victim_fails):
    """Whether a request was stopped or which forward it joins cannot be known when the hook raises, so that request
    fails alone; the monitor's progress and metrics never cost anyone their audio."""
    monitor = FailingFor(hook, "short")
    drive = Drive(engine, monitor)
    if hook == "forward_key":
        forward_key = engine.forward_key

        def failing_forward_key(state):
            monitor.maybe_fail(hook, state.request)
            return forward_key(state)

        monkeypatch.setattr(engine, "forward_key", failing_forward_key)
    results = drive.run(monkeypatch, {0: ["long", "short"], 2: ["unguided"]})
    assert_exact(results, alone, ["long", "unguided"] + ([] if victim_fails else ["short"]))
    if victim_fails:
        assert results["short"].failure == "server_error" and f"{hook} broke" in results["short"].error


def test_the_queue_time_ends_where_prepare_starts(engine, monkeypatch):
    """started_at (which ends Server-Timing's queue) is taken before prepare_request, which is timed apart."""
    drive = Drive(engine)
    prepare, entered = drive.loop.family.prepare_request, []

    def slow_prepare(request):
        entered.append(time.time())
        time.sleep(0.2)
        return prepare(request)

    monkeypatch.setattr(drive.loop.family, "prepare_request", slow_prepare)
    result = drive.run(monkeypatch, {0: ["short"]})["short"]
    assert result.started_at <= entered[0] and result.timings["prepare_s"] >= 0.2


def test_the_loops_work_is_told_as_it_goes_and_adds_up_to_its_turns(engine):
    """A long turn (an edit's encoding, many decodes) must not show as idle until it ends and then as a burst."""
    class WorkLog(GenerationMonitor):
        def __init__(self):
            self.told: list[tuple[float, float]] = []  # (when, seconds)

        def on_work(self, seconds):
            self.told.append((time.perf_counter(), seconds))

    log, request = WorkLog(), BY_ID["negative"]
    loop = StepLoop(engine, log)
    results = []
    loop.submit(request, results.append)
    started = time.perf_counter()
    loop.step()  # admits and prepares the request, and runs its first step
    first_turn = time.perf_counter() - started
    loop.run_until_idle()
    [result] = results
    calls = len(log.told)
    assert calls >= 1 + request.num_inference_steps + 2  # prepare, each step, the device wait and the decode
    assert log.told[0][1] == pytest.approx(result.timings["prepare_s"], abs=0.01)
    assert sum(1 for when, _ in log.told if when <= started + first_turn) >= 2  # told mid-turn: prepared, stepped
    told = sum(seconds for _, seconds in log.told)
    assert told <= time.perf_counter() - started
    assert told >= result.timings["prepare_s"] + result.timings["denoise_s"] + result.timings["decode_s"]


def test_neighbours_cancelled_or_expiring_mid_run_leave_the_others_exact(engine, alone, monkeypatch):
    clock = [1_000.0]
    monkeypatch.setattr(tracking.time, "time", lambda: clock[0])
    expiring = AudioRequest("a siren", seed=9, audio_length=2.0, num_inference_steps=8, id="expiring",
                            deadline=1_000.5)
    BY_ID["expiring"] = expiring
    try:
        tracker = RequestTracker()
        drive = Drive(engine, tracker)

        def between(turn):
            if turn == 2:
                tracker.cancel(["negative"])
            if turn == 3:
                clock[0] = 1_001.0  # the expiring request's deadline passes

        results = drive.run(monkeypatch, {0: ["long", "negative"], 1: ["expiring", "unguided"], 4: ["short"]}, between)
    finally:
        del BY_ID["expiring"]
    assert results["negative"].failure == "cancelled" and results["expiring"].failure == "deadline_exceeded"
    assert drive.last_turn("negative") == 2 and drive.last_turn("expiring") == 3  # nothing computed after
    assert tracker.progress(["negative"]) == {"negative": {"steps_done": 3, "steps_total": 5}}
    assert_exact(results, alone, ["long", "unguided", "short"])


def test_row_cap_holds_and_a_waiting_request_is_admitted_the_step_rows_free_up(engine, alone, monkeypatch):
    drive = Drive(engine, limits=LoopLimits(max_rows=3))
    results = drive.run(monkeypatch, {0: ["short", "unguided", "negative", "long"]})  # rows 2, 1, 2, 2
    assert_exact(results, alone, BY_ID)
    assert max(drive.rows_per_forward) <= 3
    assert drive.turns[0] == {"short", "unguided"}
    # "negative" (2 rows) waits for "short" to finish its 2 steps, then joins at once; first come, first served.
    assert drive.first_turn("negative") == 2 and drive.first_turn("long") > drive.first_turn("negative")
    assert drive.first_turn("long") == drive.last_turn("negative") + 1  # 2 + 2 rows would pass the cap before


def test_request_cap_holds(engine, alone, monkeypatch):
    drive = Drive(engine, limits=LoopLimits(max_requests=2))
    results = drive.run(monkeypatch, {0: ["unguided", "short", "negative"], 1: ["long"]})
    assert_exact(results, alone, BY_ID)
    assert max(len(ids) for ids in drive.turns) == 2
    assert drive.first_turn("negative") == drive.last_turn("short") + 1


def test_a_request_over_the_row_cap_alone_still_runs(engine, alone, monkeypatch):
    drive = Drive(engine, limits=LoopLimits(max_rows=1))
    results = drive.run(monkeypatch, {0: ["short", "unguided"]})
    assert_exact(results, alone, ["short", "unguided"])
    assert drive.first_turn("unguided") == drive.last_turn("short") + 1


def test_whole_mode_admits_only_into_an_empty_loop(engine, alone, monkeypatch):
    drive = Drive(engine, limits=LoopLimits(mode="whole"))
    results = drive.run(monkeypatch, {0: ["long", "unguided"], 2: ["short", "negative"]})
    assert_exact(results, alone, BY_ID)
    assert drive.first_turn("short") == drive.first_turn("negative") == drive.last_turn("long") + 1


def test_the_loop_thread_serves_submissions_from_other_threads(engine, alone):
    loop = StepLoop(engine, RequestTracker(), LoopLimits(max_requests=8))
    loop.start()
    results: dict[str, AudioResult] = {}
    done = threading.Event()

    def deliver(request_id, result):
        results[request_id] = result
        if len(results) == len(REQUESTS):
            done.set()

    def client(request, delay):
        time.sleep(delay)
        loop.submit(request, lambda result: deliver(request.id, result))

    rng = random.Random(0)
    threads = [threading.Thread(target=client, args=(request, rng.uniform(0, 0.3))) for request in REQUESTS]
    for thread in threads:
        thread.start()
    assert done.wait(300)
    loop.close()
    assert_exact(results, alone, BY_ID)


def test_result_board_hands_results_from_the_loop_thread_to_waiters_and_forgets_them():
    async def scenario():
        board = ResultBoard(unclaimed_ttl_s=0.2, claimed_grace_s=0.1)
        assert board.expect("a") and board.expect("b") and not board.expect("a")  # a retried submit is ignored
        threading.Thread(target=board.deliverer("a"), args=(AudioResult(audio=np.ones((2, 3))),)).start()
        threading.Thread(target=board.deliverer("b"), args=(AudioResult.failed("cancelled", "gone"),)).start()
        assert board.expect("c") and await board.wait("c", 0.05) is None  # not there yet: asked again later
        first = await board.wait("a", 5)
        again = await board.wait("a", 5)  # within the grace: a retried result call still finds it
        assert first is again and first.audio.shape == (2, 3)
        await asyncio.sleep(0.3)
        assert len(board) == 1  # collected and uncollected results are both forgotten; "c" still waits
        assert (await board.wait("b", 5)).failure == "unknown_generation"  # as after an engine restart
        board.deliverer("c")(AudioResult(audio=np.zeros((2, 1))))
        assert (await board.wait("c", 5)).audio.shape == (2, 1)  # a later ask gets what came meanwhile

    asyncio.run(scenario())


def test_collected_results_kept_for_a_retry_hold_at_most_their_byte_budget_oldest_dropped_first():
    """A fast GPU collects GBs of audio within the grace; a retried result call comes at once, so the oldest go."""
    async def scenario():
        board = ResultBoard(claimed_max_bytes=100)
        for generation_id, samples in (("a", 3), ("b", 3), ("c", 3), ("huge", 100)):  # float64: 48, 48, 48, 1600 B
            board.expect(generation_id)
            board.deliverer(generation_id)(AudioResult(audio=np.ones((2, samples))))
        await asyncio.sleep(0.05)

        async def still_held(*ids):  # asked again, as a retried result call would
            return [generation_id for generation_id in ids if (await board.wait(generation_id, 1)).audio is not None]

        for generation_id in "abc":
            await board.wait(generation_id, 1)
        three_collected = await still_held("a", "b", "c")
        await board.wait("huge", 1)
        return three_collected, await still_held("a", "b", "c", "huge"), len(board)

    three_collected, after_huge, held = asyncio.run(scenario())
    assert three_collected == ["b", "c"]  # 144 B held: the oldest dropped
    assert after_huge == ["huge"] and held == 1  # the newest stays whatever its size


def test_a_stopping_engine_waits_until_every_result_is_collected_or_given_up_on():
    """What the engine waits for after SIGTERM: nothing still generating, and every result collected by the front
    (which asks at once) or left uncollected for a while (its request was abandoned)."""
    async def scenario():
        board = ResultBoard()
        board.expect("collected"), board.expect("abandoned")
        waiting = asyncio.ensure_future(board.all_collected(given_up_after_s=0.5, quiet_s=0))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # both still generating
        board.deliverer("collected")(AudioResult(audio=np.ones((2, 1))))
        board.deliverer("abandoned")(AudioResult.failed("cancelled", "gone"))
        await asyncio.sleep(0.05)
        posted = time.monotonic()
        assert (await board.wait("collected", 1)).audio.shape == (2, 1)
        await asyncio.wait_for(waiting, 5)
        return time.monotonic() - posted

    assert 0.3 < asyncio.run(scenario()) < 5  # the abandoned result was waited for, not forever


def test_a_stopping_engine_waits_for_a_request_still_on_its_way():
    """A request the front admitted just before the stop may arrive after it: the engine stays until arrivals have
    been quiet for quiet_s, and then until that request's result is collected."""
    async def scenario():
        board = ResultBoard()
        started = time.monotonic()
        waiting = asyncio.ensure_future(board.all_collected(quiet_s=2.0))
        await asyncio.sleep(1.0)
        assert not waiting.done()
        board.expect("late")  # arrives during the quiet period: the wait starts over, and includes it
        await asyncio.sleep(2.5)
        assert not waiting.done()  # quiet for long enough now, but "late" is still generating
        board.deliverer("late")(AudioResult(audio=np.ones((2, 1))))
        await board.wait("late", 1)
        await asyncio.wait_for(waiting, 5)
        return time.monotonic() - started

    assert 3.0 < asyncio.run(scenario()) < 8


def test_a_generation_no_one_asks_for_is_cancelled_and_no_longer_holds_up_a_stop(caplog):
    """A killed front leaves its generations running for no one: one that no result call has waited for in
    ``orphaned_after_s`` is cancelled through the tracker, with one log line, and a stop stops waiting for it; one
    with a call waiting (however long it has waited), or asked again within the threshold, goes on."""
    tracker = RequestTracker()

    def cancelled(generation_id):
        stopped = tracker.interruption(AudioRequest("x", seed=0, audio_length=1.0, id=generation_id))
        return stopped is not None and stopped.failure == "cancelled"

    async def ask_again_and_again(board, generation_id):
        while await board.wait(generation_id, 0.1) is None:
            await asyncio.sleep(0.05)  # a slow front: the gap between calls is well inside the threshold

    async def scenario():
        board = ResultBoard(orphaned_after_s=0.4)
        board.drop_orphans(tracker.cancel, every_s=0.05)
        for generation_id in ("orphan", "waited", "asked_again"):
            board.expect(generation_id, label=f"ticket-{generation_id}")
        waited = asyncio.ensure_future(board.wait("waited", 5))  # one call, waiting far past the threshold
        asked_again = asyncio.ensure_future(ask_again_and_again(board, "asked_again"))
        await asyncio.sleep(0.25)
        assert not any(map(cancelled, ("orphan", "waited", "asked_again")))  # not yet: within the threshold
        await asyncio.sleep(0.75)
        assert cancelled("orphan") and not cancelled("waited") and not cancelled("asked_again")
        stopping = asyncio.ensure_future(board.all_collected(quiet_s=0))
        await asyncio.sleep(0.3)
        assert not stopping.done()  # the asked-for ones are still generating
        for generation_id in ("waited", "asked_again"):
            board.deliverer(generation_id)(AudioResult(audio=np.ones((2, 1))))
        assert (await waited).audio.shape == (2, 1)
        await asyncio.wait_for(asked_again, 1)
        await asyncio.wait_for(stopping, 1)  # the orphan, never finished here, does not hold the stop up

    with caplog.at_level("WARNING", logger="stable_audio_bento.tracking"):
        asyncio.run(scenario())
    dropped = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert len(dropped) == 1 and dropped[0].startswith("request ticket-orphan dropped: no one has asked for its "
                                                       "result for 0 s: its front is gone")
