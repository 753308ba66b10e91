"""``STABLE_AUDIO_COMPILE=cuda-graphs``: the eager DiT forward replayed from CUDA graphs gives what the eager forward
gives, for every shape, for fresh inputs of a shape already recorded, and for outputs kept past the next replay.

The tests that replay graphs need a GPU: `bash benchmarks/gpu.sh graphs` runs this file on one. Here (CPU) only the
setting's parsing, its refusal on a CPU run, and the memory probe's switch to the eager forward."""

from __future__ import annotations

import pytest
import torch

from stable_audio_bento.compilation import eager_forward
from stable_audio_bento.config import EngineConfig, parse_compile_mode
from stable_audio_bento.cuda_graphs import MAX_OOM_RECORDINGS, GraphedForward
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.loading import ModelLoadError, load_engine, load_pipeline
from stable_audio_bento.pipeline import BatchedStableAudio
from stable_audio_bento.sa3 import BatchedStableAudio3
from stable_audio_bento.sa3_loading import TINY_MAX_SECONDS, load_tiny_sa3, place_sa3_pipeline
from stable_audio_bento.step_loop import run_to_completion

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (gpu.sh graphs)")
CUDA = torch.device("cuda")


def test_the_setting_names_cuda_graphs():
    assert parse_compile_mode("cuda-graphs") == "cuda-graphs"
    with pytest.raises(ValueError, match="cuda-graphs"):
        parse_compile_mode("cuda-graph")


def test_a_cpu_engine_refuses_cuda_graphs_by_name(model_cache):
    with pytest.raises(ModelLoadError, match="STABLE_AUDIO_COMPILE=cuda-graphs needs a CUDA device.*cpu"):
        load_engine(EngineConfig(model="tiny", device="cpu", compile="cuda-graphs"))


def test_memory_probes_run_the_eager_forward_and_restore_the_prepared_one(tiny_pipe):
    engine = BatchedStableAudio(tiny_pipe)
    engine.compile("default")  # lazily: nothing compiles here
    prepared = engine._transformer_forward
    with pytest.raises(RuntimeError, match="probe failed"), eager_forward(engine):
        assert engine._transformer_forward == engine.transformer_forward
        raise RuntimeError("probe failed")
    assert engine._transformer_forward is prepared


def mixed_requests(seconds: float = 3.0, seed: int = 1) -> list[AudioRequest]:
    """A guided and an unguided request: three DiT rows."""
    return [AudioRequest("rain on a tin roof", seed=seed, audio_length=seconds, num_inference_steps=4),
            AudioRequest("a cello", seed=seed + 1, audio_length=seconds, guidance_scale=1.0, num_inference_steps=4)]


@pytest.fixture(scope="module")
def cuda_pipe(model_cache):
    return load_pipeline(EngineConfig(model="tiny", device="cuda", dtype="float32"))


@pytest.fixture(scope="module")
def graphed_and_eager(cuda_pipe):
    graphed = BatchedStableAudio(cuda_pipe)
    graphed.compile("cuda-graphs")
    return graphed, BatchedStableAudio(cuda_pipe)


def predictions(engine, requests: list[AudioRequest]) -> list[torch.Tensor]:
    return engine.forward([engine.prepare_request(request) for request in requests])


@needs_cuda
def test_a_shape_is_recorded_on_its_second_call_and_replays_equal_eager_forwards(graphed_and_eager):
    """Fresh inputs of a recorded shape, and outputs kept past the next replay."""
    graphed, eager = graphed_and_eager
    first, second = mixed_requests(seed=1), mixed_requests(seed=5)  # one shape, other values
    warm_up = predictions(graphed, first)  # its first call: eager
    assert graphed._transformer_forward.recorded == {}
    kept = predictions(graphed, first)  # recorded, then replayed
    again = predictions(graphed, second)  # replayed
    assert len(graphed._transformer_forward.recorded) == 1
    for got, want in zip(warm_up + kept + again, 2 * predictions(eager, first) + predictions(eager, second)):
        torch.testing.assert_close(got, want)
    assert not torch.equal(again[0], kept[0])


@needs_cuda
def test_graphed_generations_equal_eager_ones_across_shapes(graphed_and_eager):
    """The full window at the rows of a guided request alone, then of a guided and an unguided one."""
    graphed, eager = graphed_and_eager
    for requests in (mixed_requests()[:1], mixed_requests(seconds=2.0, seed=9)):
        for got, want in zip(run_to_completion(graphed, requests), run_to_completion(eager, requests)):
            torch.testing.assert_close(torch.from_numpy(got.audio), torch.from_numpy(want.audio))
    assert len(graphed._transformer_forward.recorded) == 2


@needs_cuda
def test_a_recording_out_of_memory_runs_that_call_eagerly_and_gives_up_after_three(cuda_pipe, monkeypatch):
    class OutOfMemoryCapture:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        def __exit__(self, *exc_info):
            return False

    monkeypatch.setattr(torch.cuda, "graph", OutOfMemoryCapture)
    engine, eager = BatchedStableAudio(cuda_pipe), BatchedStableAudio(cuda_pipe)
    graphed = engine._transformer_forward = GraphedForward(engine.transformer_forward, CUDA)
    requests = mixed_requests()[:1]
    for _ in range(1 + MAX_OOM_RECORDINGS + 1):  # the warm-up, the tries, then eager for good
        for got, want in zip(predictions(engine, requests), predictions(eager, requests)):
            torch.testing.assert_close(got, want)
    [key] = graphed.oom_recordings
    assert graphed.oom_recordings[key] == MAX_OOM_RECORDINGS and key in graphed.eager_shapes and not graphed.recorded


@needs_cuda
def test_past_the_most_graphs_the_least_recently_used_is_dropped(cuda_pipe):
    engine, eager = BatchedStableAudio(cuda_pipe), BatchedStableAudio(cuda_pipe)
    graphed = engine._transformer_forward = GraphedForward(engine.transformer_forward, CUDA, max_graphs=1)
    guided, mixed = mixed_requests()[:1], mixed_requests()  # 2 and 3 rows
    # the rows of the one graph kept after each call: a shape is recorded on its second call, dropping the other
    for requests, kept_rows in ((guided, None), (guided, 2), (mixed, 2), (mixed, 3), (guided, 2)):
        for got, want in zip(predictions(engine, requests), predictions(eager, requests)):
            torch.testing.assert_close(got, want)
        assert [key[0][0][0] for key in graphed.recorded] == ([kept_rows] if kept_rows else [])


@needs_cuda
def test_the_rows_that_fit_are_measured_on_the_eager_forward(graphed_and_eager):
    """A replay allocates nothing (its memory was set aside when recorded): measured on it, the cap would be huge."""
    graphed, eager = graphed_and_eager
    expected = eager.rows_capacity()
    for _ in range(3):  # by the third, a probe through the graphs would be a replay
        assert 0.5 * expected <= graphed.rows_capacity() <= 2 * expected
    assert isinstance(graphed._transformer_forward, GraphedForward)


@pytest.fixture(scope="module")
def sa3_graphed_and_eager(tmp_path_factory):
    pipe = place_sa3_pipeline(load_tiny_sa3(tmp_path_factory.mktemp("tiny-sa3")), CUDA, torch.float32, torch.float32)
    graphed = BatchedStableAudio3(pipe, TINY_MAX_SECONDS)
    graphed.compile("cuda-graphs")
    return graphed, BatchedStableAudio3(pipe, TINY_MAX_SECONDS)


def sa3_requests() -> list[AudioRequest]:
    """A text request and an inpainting one (its forward takes the inpainting's local conditioning, else None)."""
    rate = 44100
    upload = torch.sin(torch.arange(int(2.5 * rate)) / rate * 2 * torch.pi * 220).repeat(2, 1).numpy()
    return [AudioRequest("a cello", seed=3, audio_length=2.5, num_inference_steps=4),
            AudioRequest("a violin", seed=4, audio_length=2.5, num_inference_steps=4, guidance_scale=1.0,
                         init_audio=upload, mask_start=0.5, mask_end=1.5)]


@needs_cuda
def test_stable_audio_3_text_and_inpainting_replay_as_eager(sa3_graphed_and_eager):
    graphed, eager = sa3_graphed_and_eager
    requests = sa3_requests()
    for got, want in zip(run_to_completion(graphed, requests), run_to_completion(eager, requests)):
        torch.testing.assert_close(torch.from_numpy(got.audio), torch.from_numpy(want.audio))
    assert len(graphed._transformer_forward.recorded) >= 2


@needs_cuda
@pytest.mark.parametrize("family", ["stable-audio-open", "stable-audio-3"])
def test_a_step_after_the_first_never_waits_for_the_gpu(family, graphed_and_eager, sa3_graphed_and_eager):
    """The host queues a step's forward and solver steps and goes on to the next: a sync (a GPU value read on the
    host) would make it wait for the GPU every step, and the GPU then wait for the host. The first steps may (the
    scheduler finds its place in its schedule; new shapes are recorded)."""
    engine = graphed_and_eager[0] if family == "stable-audio-open" else sa3_graphed_and_eager[0]
    states = [engine.prepare_request(request)
              for request in (mixed_requests() if family == "stable-audio-open" else sa3_requests())]

    def step() -> None:  # one forward per group of states that can share one, as the step loop runs them
        groups: dict = {}
        for state in states:
            groups.setdefault(engine.forward_key(state), []).append(state)
        for group in groups.values():
            for state, output in zip(group, engine.forward(group)):
                engine.advance(state, output)

    step()
    step()  # its shapes are recorded by now
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_a_recording_the_forward_breaks_leaves_that_shape_eager_on_the_default_stream(cuda_pipe):
    """A forward that reads a GPU value on the host cannot be captured: the capture is invalidated and ending it
    raises. The call runs eagerly, and so do later ones of that shape, on the thread's own stream again. Last in
    this file: a GPU whose capture went wrong should not take the other tests with it."""
    engine, eager = BatchedStableAudio(cuda_pipe), BatchedStableAudio(cuda_pipe)
    forward = engine.transformer_forward

    def syncing_forward(*args):
        output = forward(*args)
        output.sum().item()
        return output

    graphed = engine._transformer_forward = GraphedForward(syncing_forward, CUDA)
    requests = mixed_requests()[:1]
    for _ in range(3):  # eager, the failed recording, eager for good
        for got, want in zip(predictions(engine, requests), predictions(eager, requests)):
            torch.testing.assert_close(got, want)
        assert torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA)
    assert len(graphed.eager_shapes) == 1 and not graphed.recorded
