"""Idempotency-Key on job submissions, in-process with a stand-in gateway: a request sent again with its key gets
the job the first one created, never a second job, whatever happened to the first answer; a key is bound to its
request; and a key whose first request made no job is free again."""

from __future__ import annotations

import asyncio

import pytest

from stable_audio_bento.admission import Admission
from stable_audio_bento.gateway import Delivery, GeneratedAudio
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.idempotency import HEADER, request_fingerprint
from stable_audio_bento.jobs import JobStore
from stable_audio_bento.protocol import APIError, EditRequest, GenerateRequest
from stable_audio_bento.serving import RequestContext

BELL = GenerateRequest(input="a bell", audio_length=1.0, seed=3)


class PreparingGateway:
    """Prepares a request once ``ready`` is set, raising the next of ``refusals`` if any are left; its generations
    end at once with silence."""

    def __init__(self, refusals=()):
        self.admission = Admission(max_pending=100, max_batch_size=8)
        self.ready = asyncio.Event()
        self.ready.set()
        self.refusals = list(refusals)
        self.prepared = 0

    async def prepare(self, request: GenerateRequest, request_id: str, generation_id: str) -> AudioRequest:
        await self.ready.wait()
        if self.refusals:
            raise self.refusals.pop(0)
        self.prepared += 1
        return AudioRequest(request.input, seed=request.seed or 0, audio_length=request.audio_length or 1.0,
                            id=generation_id)

    async def generate(self, job: AudioRequest, delivery: Delivery, disconnected=None) -> GeneratedAudio:
        return GeneratedAudio(b"\0" * 100, "wav", job.seed, 1, 1.0)

    async def progress(self, ids):
        return {}


def store_of(gateway: PreparingGateway, ttl_s: float = 60) -> JobStore:
    return JobStore(gateway, ttl_s=ttl_s, max_finished=10, max_run_s=900)


def keyed(key: str | None) -> RequestContext:
    return RequestContext(request_id="r", idempotency_key=key)


def test_a_request_sent_again_with_its_key_gets_the_first_job_and_no_second_generation():
    async def scenario():
        store = store_of(gateway := PreparingGateway())
        first, replayed_first = await store.create(BELL, keyed("k-1"))
        await asyncio.wait([first.task])  # finished, or still running: the same job either way
        again, replayed_again = await store.create(GenerateRequest(**BELL.model_dump()), keyed("k-1"))
        other, _ = await store.create(BELL, keyed("k-2"))
        unkeyed = [(await store.create(BELL, keyed(None)))[0] for _ in range(2)]
        return first, replayed_first, again, replayed_again, other, unkeyed, gateway.prepared

    first, replayed_first, again, replayed_again, other, unkeyed, prepared = asyncio.run(scenario())
    assert again is first and (replayed_first, replayed_again) == (False, True)
    assert other is not first and unkeyed[0] is not unkeyed[1]
    assert prepared == 4  # k-1 once, k-2, and each unkeyed request


def test_a_key_is_the_same_request_whether_defaults_are_written_out_or_not_and_refuses_another():
    async def scenario():
        store = store_of(PreparingGateway())
        first, _ = await store.create(GenerateRequest(input="a bell"), keyed("k"))
        spelled_out, replayed = await store.create(GenerateRequest(input="a bell", seed=None, audio_start=0.0),
                                                   keyed("k"))
        assert spelled_out is first and replayed
        with pytest.raises(APIError) as refused:
            await store.create(GenerateRequest(input="a bell", seed=5), keyed("k"))
        return refused.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.param, refused.code) == (422, HEADER, "idempotency_key_reused")


def test_a_copy_arriving_while_the_first_is_prepared_is_told_to_wait_and_makes_no_job():
    async def scenario():
        store = store_of(gateway := PreparingGateway())
        gateway.ready.clear()  # an upload still decoding, say
        first = asyncio.create_task(store.create(BELL, keyed("k")))
        await asyncio.sleep(0.01)
        with pytest.raises(APIError) as told:
            await store.create(BELL, keyed("k"))
        gateway.ready.set()
        job, _ = await first
        return told.value, job, await store.create(BELL, keyed("k")), len(store._jobs)

    told, job, (again, replayed), jobs = asyncio.run(scenario())
    assert (told.status, told.param, told.code, told.retry_after) == (409, HEADER, "idempotency_key_in_use", 1)
    assert again is job and replayed and jobs == 1


def test_a_key_whose_request_was_refused_or_abandoned_is_free_again():
    async def scenario():
        busy = APIError("busy", status=429, code="server_busy", retry_after=5)
        store = store_of(gateway := PreparingGateway(refusals=[busy]))
        with pytest.raises(APIError):
            await store.create(BELL, keyed("k"))
        gateway.ready.clear()
        abandoned = asyncio.create_task(store.create(BELL, keyed("k")))  # its client went away mid-upload
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.wait([abandoned])
        gateway.ready.set()
        return await store.create(BELL, keyed("k")), len(store.keys)

    (job, replayed), keys = asyncio.run(scenario())
    assert not replayed and job.status in ("queued", "succeeded") and keys == 1


def test_a_job_its_engine_lost_frees_its_key_for_the_resend_its_error_asks_for():
    class LosingGateway(PreparingGateway):
        async def generate(self, job, delivery, disconnected=None):
            if self.prepared == 1:
                raise APIError("the model engine is unavailable: it restarted and lost this request; send it again",
                               status=503, code="engine_unavailable", retry_after=1)
            return await super().generate(job, delivery, disconnected)

    async def scenario():
        store = store_of(LosingGateway())
        lost, _ = await store.create(BELL, keyed("k"))
        await asyncio.wait([lost.task])
        resent, replayed = await store.create(BELL, keyed("k"))
        await asyncio.wait([resent.task])
        return lost, resent, replayed, await store.create(BELL, keyed("k"))

    lost, resent, replayed, (again, replayed_again) = asyncio.run(scenario())
    assert lost.status == "failed" and resent is not lost and not replayed and resent.status == "succeeded"
    assert again is resent and replayed_again


def test_a_key_is_forgotten_with_its_job():
    async def scenario():
        store = store_of(PreparingGateway(), ttl_s=0.05)
        first, _ = await store.create(BELL, keyed("k"))
        await asyncio.wait([first.task])
        await asyncio.sleep(0.1)  # finished longer ago than the ttl: the job and its key are gone
        second, replayed = await store.create(GenerateRequest(input="another request"), keyed("k"))
        return first, second, replayed, len(store.keys)

    first, second, replayed, keys = asyncio.run(scenario())
    assert second is not first and not replayed and keys == 1


def test_a_key_sent_as_the_drafts_quoted_string_is_the_same_key_as_sent_bare():
    async def scenario():
        store = store_of(PreparingGateway())
        first, _ = await store.create(BELL, keyed('8e03978e-"x"\\y'))
        quoted, replayed = await store.create(BELL, keyed('"8e03978e-\\"x\\"\\\\y"'))
        return first, quoted, replayed

    first, quoted, replayed = asyncio.run(scenario())
    assert quoted is first and replayed


@pytest.mark.parametrize("key", ["", "x" * 256, "clé", "a\nb", "tab\there", '""', '"a"b"', '"a\\x"', '"a\\"'])
def test_an_unusable_key_is_a_400_naming_the_header(key):
    with pytest.raises(APIError) as refused:
        asyncio.run(store_of(PreparingGateway()).create(BELL, keyed(key)))
    assert (refused.value.status, refused.value.param, refused.value.code) == (400, HEADER, "invalid_idempotency_key")


def test_an_edit_is_identified_by_its_uploads_bytes_not_its_path(tmp_path):
    def edit(name: str, content: bytes, **fields) -> EditRequest:
        (tmp_path / name).write_bytes(content)
        return EditRequest(input="a cello", audio=tmp_path / name, **fields)

    same = request_fingerprint(edit("a.wav", b"RIFF1"))
    assert request_fingerprint(edit("b.wav", b"RIFF1")) == same
    assert request_fingerprint(edit("c.wav", b"RIFF2")) != same
    assert request_fingerprint(edit("d.wav", b"RIFF1", strength=0.3)) != same
