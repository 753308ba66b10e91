"""In-process: faults, cancellations and deadlines touch only their own request, and never change the others'
audio; admission control refuses at its bound and drains on shutdown."""

from __future__ import annotations

import asyncio
import time
import weakref

import numpy as np
import pytest
import torch

from stable_audio_bento.admission import Admission
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.protocol import APIError
from stable_audio_bento.step_loop import run_to_completion
from stable_audio_bento.tracking import RequestTracker

BATCH = [
    AudioRequest(f"sound number {i}", seed=20 + i, audio_length=2.0 + i, num_inference_steps=4 + i % 2,
                 guidance_scale=[7.0, 1.0][i % 2], id=f"r{i}")
    for i in range(4)
]


@pytest.fixture(scope="module")
def alone(engine) -> dict[str, np.ndarray]:
    return {request.id: run_to_completion(engine, [request])[0].audio for request in BATCH}


def assert_untouched(results, alone, failed_ids):
    for request, result in zip(BATCH, results):
        if request.id in failed_ids:
            assert result.audio is None and result.error
        else:
            assert result.error is None and np.array_equal(result.audio, alone[request.id]), request.id


def spy_on_forwards(engine, monkeypatch, fail_when=None) -> list[set[str]]:
    """Records the request ids of every batched forward; raises the injected error when ``fail_when`` says so."""
    forwards, forward = [], engine.forward

    def spied(states):
        ids = {state.request.id for state in states}
        forwards.append(ids)
        if fail_when is not None and fail_when(ids):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return forward(states)

    monkeypatch.setattr(engine, "forward", spied)
    return forwards


def test_an_out_of_memory_step_is_retried_in_halves_and_fails_only_its_culprit(engine, alone, monkeypatch):
    forwards = spy_on_forwards(engine, monkeypatch, fail_when=lambda ids: "r2" in ids)
    results = run_to_completion(engine, BATCH)
    assert results[2].failure == "server_error"
    # the gateway answers "generation failed: " and this, once (it used to be said twice)
    assert results[2].error.startswith("OutOfMemoryError: CUDA out of memory"), results[2].error
    assert_untouched(results, alone, {"r2"})
    # The first step: the whole group, then halves until r2 is alone; no work is redone, the rest go on together.
    assert forwards[:5] == [{"r0", "r1", "r2", "r3"}, {"r0", "r1"}, {"r2", "r3"}, {"r2"}, {"r3"}]
    assert forwards[5] == {"r0", "r1", "r3"} and all("r2" not in ids for ids in forwards[5:])


@pytest.mark.parametrize("chained", [False, True])
def test_an_out_of_memory_step_is_retried_with_the_failed_forwards_memory_given_back(engine, alone, monkeypatch,
                                                                                     chained):
    """A device with room for 6 rows of activations, a forward needing twice its rows: the four requests (6 rows)
    never fit together, each half (3 rows) does, once the failed forward's tensors are freed; also when the error
    is raised while another is handled (a fallback kernel path), whose traceback holds the same frame."""
    forward, live = engine.forward, weakref.WeakSet()

    class Activations:
        def __init__(self, rows: int):
            self.rows = rows

    def on_a_small_device(states):
        activations = Activations(2 * sum(state.request.rows for state in states))  # alive while this frame is
        live.add(activations)
        if sum(held.rows for held in live) > 6:
            if not chained:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            try:
                raise RuntimeError("the fast kernel failed")
            except RuntimeError:
                raise torch.OutOfMemoryError("CUDA out of memory in the fallback (simulated)")
        return forward(states)

    monkeypatch.setattr(engine, "forward", on_a_small_device)
    assert_untouched(run_to_completion(engine, BATCH), alone, failed_ids=set())


@pytest.mark.parametrize("bad_audio, message", [(np.nan, "non-finite"), (0.0, "silence")])
def test_nan_or_silent_audio_is_never_a_success(engine, alone, monkeypatch, bad_audio, message):
    decode_window = engine.decode_window

    def corrupt(latents, request):
        audio = decode_window(latents, request)
        return np.full_like(audio, bad_audio) if request.id == "r1" else audio

    monkeypatch.setattr(engine, "decode_window", corrupt)
    results = run_to_completion(engine, BATCH)
    assert results[1].failure == "server_error" and message in results[1].error
    assert_untouched(results, alone, {"r1"})


class CancelAtStep(RequestTracker):
    """Cancels one request once it has done ``steps`` steps, as a client disconnecting mid-batch would."""

    def __init__(self, request_id: str, steps: int):
        super().__init__()
        self.request_id, self.steps = request_id, steps

    def on_step(self, request, steps_done, steps_total):
        super().on_step(request, steps_done, steps_total)
        if request.id == self.request_id and steps_done == self.steps:
            self.cancel([request.id])


def test_cancelling_mid_batch_stops_at_the_next_step_and_leaves_the_others_exact(engine, alone, monkeypatch):
    forwards = spy_on_forwards(engine, monkeypatch)
    tracker = CancelAtStep("r0", steps=2)
    results = run_to_completion(engine, BATCH, tracker)
    assert results[0].failure == "cancelled"
    assert_untouched(results, alone, {"r0"})
    assert sum("r0" in ids for ids in forwards) == 2  # no step computed after the cancel
    assert tracker.progress(["r0"]) == {"r0": {"steps_done": 2, "steps_total": 4}}


def test_cancelled_or_expired_requests_waiting_for_a_batch_are_never_computed(engine, alone, monkeypatch):
    forwards = spy_on_forwards(engine, monkeypatch)
    tracker = RequestTracker()
    tracker.cancel(["r1"])  # a cancel that arrives before its request does
    expired = {**BATCH[3].__dict__, "deadline": time.time() - 1}
    batch = [*BATCH[:3], AudioRequest(**expired)]
    results = run_to_completion(engine, batch, tracker)
    assert results[1].failure == "cancelled" and results[3].failure == "deadline_exceeded"
    assert_untouched(results[:3], alone, {"r1"})
    assert not any({"r1", "r3"} & ids for ids in forwards)
    assert set(tracker.progress(["r0", "r1", "r2", "r3"])) == {"r0", "r2"}


def test_tracker_forgets_old_entries():
    tracker = RequestTracker(max_entries=2)
    tracker.cancel(["a", "b", "c"])
    assert tracker.interruption(AudioRequest("x", seed=0, audio_length=1, id="a")) is None
    assert tracker.interruption(AudioRequest("x", seed=0, audio_length=1, id="c")).failure == "cancelled"


def test_a_request_cancelled_because_its_timeout_passed_counts_as_past_its_deadline():
    """The front cancels a request once it sees its timeout pass; the engine must still say why it stopped."""
    tracker = RequestTracker()
    tracker.cancel(["late", "gone"])
    late = AudioRequest("x", seed=0, audio_length=1, id="late", deadline=time.time() - 0.01)
    gone = AudioRequest("x", seed=0, audio_length=1, id="gone", deadline=time.time() + 60)
    assert tracker.interruption(late).failure == "deadline_exceeded"
    assert tracker.interruption(gone).failure == "cancelled"


def test_admission_refuses_past_its_bound_with_a_retry_estimate():
    async def scenario():
        admission = Admission(max_pending=2, max_batch_size=2)
        first, second = admission.admit("a"), admission.admit("b")
        with pytest.raises(APIError) as refused:
            admission.admit("c")
        assert refused.value.status == 429 and refused.value.retry_after >= 1
        admission.record_service_time(12.0)
        with pytest.raises(APIError) as refused:
            admission.admit("c")
        assert refused.value.retry_after == 12
        with first:
            pass
        with admission.admit("c"), second:
            assert list(admission.pending) == ["b", "c"]

    asyncio.run(scenario())


def test_admission_drains_before_shutdown():
    async def scenario():
        admission = Admission(max_pending=4, max_batch_size=4)
        slot = admission.admit("in-flight")
        drained = asyncio.ensure_future(admission.drain())
        await asyncio.sleep(0.05)
        assert not drained.done()
        with pytest.raises(APIError) as refused:
            admission.admit("late")
        assert refused.value.status == 503 and refused.value.retry_after
        with slot:
            pass
        await asyncio.wait_for(drained, 1)

    asyncio.run(scenario())
