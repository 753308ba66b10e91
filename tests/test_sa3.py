"""The Stable Audio 3 family's stages against diffusers' StableAudio3Pipeline, against themselves under different
batches, and with requests joining a running step loop; on a tiny random model built once for this module. Also the
windowed decode against the whole one, and the published models' full-size architectures."""

from __future__ import annotations

import inspect
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableAudio3Pipeline
from diffusers.models.autoencoders.autoencoder_same import AutoencoderSAME
from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3DiTModel

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.generation import AudioRequest, AudioResult
from stable_audio_bento.loading import ModelLoadError, load_sa3_engine
from stable_audio_bento.pipeline import SamplingOptions
from stable_audio_bento.sa3 import BatchedStableAudio3, SA3Options
from stable_audio_bento.sa3_loading import (FREQUENCY_BUFFERS, MEDIUM_ARCHITECTURE, SMALL_ARCHITECTURE,
                                            TINY_ARCHITECTURE, TINY_MAX_SECONDS, TINY_SA3, TINY_SA3_BASE,
                                            build_sa3_pipeline, is_sa3_model, load_tiny_sa3, max_seconds_for,
                                            place_sa3_pipeline, published_architecture, randomize_zero_initialised,
                                            tiny_sa3_model_dir, trained_max_seconds)
from stable_audio_bento.same_chunked import uses_chunked_attention
from stable_audio_bento.same_windows import decoder_reach_frames
from stable_audio_bento.startup import warm_up
from stable_audio_bento.step_loop import StepLoop, run_to_completion
from conftest import snr_db


@pytest.fixture(scope="module")
def sa3_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sa3-cache")


@pytest.fixture(scope="module")
def pipes(sa3_cache):
    """Both tiny variants, each saved with save_pretrained and read back with from_pretrained."""
    return {variant: load_tiny_sa3(sa3_cache / variant, variant) for variant in (TINY_SA3, TINY_SA3_BASE)}


WHOLE_DECODE = SA3Options(window_frames=None)  # as the pipeline decodes: bit-identical


@pytest.fixture(scope="module")
def families(pipes):
    return {variant: BatchedStableAudio3(pipe, options=WHOLE_DECODE) for variant, pipe in pipes.items()}


@pytest.fixture(scope="module")
def family(families):
    return families[TINY_SA3]


def diffusers_reference(pipe, request: AudioRequest, default_steps: int | None = None) -> np.ndarray:
    """The pipeline's audio for one request; a request for the default step count leaves the pipeline to choose."""
    return pipe(
        request.prompt,
        duration=request.audio_length,
        num_inference_steps=None if request.num_inference_steps == default_steps else request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt,
        generator=torch.Generator().manual_seed(request.seed),
    ).audios[0].numpy()


REFERENCE_CASES = {
    "distilled, unguided, default 8 steps": (TINY_SA3, AudioRequest(
        "a dog barking", seed=7, audio_length=3.0, guidance_scale=1.0, num_inference_steps=8)),
    "distilled, guided, negative prompt": (TINY_SA3, AudioRequest(
        "a piano playing a gentle melody", seed=11, audio_length=2.5, negative_prompt="low quality, distorted",
        guidance_scale=3.0, num_inference_steps=5)),
    "distilled, guided, no negative prompt, odd duration": (TINY_SA3, AudioRequest(
        "rain on a tin roof", seed=5, audio_length=1.2345, guidance_scale=2.0, num_inference_steps=4)),
    "distilled, unguided, longer, negative prompt ignored": (TINY_SA3, AudioRequest(
        "thunder", seed=3, audio_length=7.77, negative_prompt="ignored", guidance_scale=1.0, num_inference_steps=3)),
    "base, guided, negative prompt": (TINY_SA3_BASE, AudioRequest(
        "a synth pad", seed=9, audio_length=2.0, negative_prompt="noise", guidance_scale=4.0, num_inference_steps=6)),
    "base, unguided": (TINY_SA3_BASE, AudioRequest(
        "birds", seed=2, audio_length=4.1, guidance_scale=1.0, num_inference_steps=5)),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_single_request_is_bit_identical_to_diffusers(pipes, families, case):
    variant, request = REFERENCE_CASES[case]
    [result] = run_to_completion(families[variant], [request])
    expected = diffusers_reference(pipes[variant], request, families[variant].default_steps)
    assert result.error is None
    assert result.audio.shape == expected.shape == (2, int(request.audio_length * 44100))
    assert result.audio.dtype == np.float32
    assert np.array_equal(result.audio, expected)
    assert np.abs(result.audio).max() > 0


MIXED_BATCH = [  # three of 22 latent frames, two of 36; guided and not; different step counts
    AudioRequest("ocean waves crashing", seed=1, audio_length=2.0, guidance_scale=1.0, num_inference_steps=8),
    AudioRequest("guitar playing", seed=2, audio_length=1.98, negative_prompt="low quality", guidance_scale=3.0,
                 num_inference_steps=5),
    AudioRequest("stadium crowd cheering", seed=3, audio_length=2.0, guidance_scale=1.0, num_inference_steps=3),
    AudioRequest("a bell ringing", seed=4, audio_length=3.3, guidance_scale=2.5, num_inference_steps=6),
    AudioRequest("a dog barking", seed=1, audio_length=3.3, guidance_scale=1.0, num_inference_steps=8),
]


def test_batch_does_not_change_any_request(family):
    assert [family.latent_frames(r.audio_length) for r in MIXED_BATCH] == [22, 22, 22, 36, 36]
    batched = run_to_completion(family, MIXED_BATCH)
    reordered = run_to_completion(family, MIXED_BATCH[::-1])[::-1]
    assert [result.batch_size for result in batched] == [3, 3, 3, 2, 2]  # equal lengths really shared forwards
    for request, in_batch, in_other_order in zip(MIXED_BATCH, batched, reordered):
        [alone] = run_to_completion(family, [request])
        assert in_batch.error is None and alone.error is None
        assert in_batch.audio.shape == (2, int(request.audio_length * 44100))
        assert np.array_equal(in_batch.audio, alone.audio), request
        assert np.array_equal(in_other_order.audio, alone.audio), request


def test_base_model_batch_does_not_change_any_request(families):
    base = families[TINY_SA3_BASE]
    batched = run_to_completion(base, MIXED_BATCH[:3])
    for request, in_batch in zip(MIXED_BATCH[:3], batched):
        [alone] = run_to_completion(base, [request])
        assert np.array_equal(in_batch.audio, alone.audio), request


JOINING = {
    "first": AudioRequest("a long drone", seed=21, audio_length=2.0, guidance_scale=1.0, num_inference_steps=8),
    "joiner": AudioRequest("a piano melody", seed=22, audio_length=1.98, negative_prompt="noise, distortion",
                           guidance_scale=4.0, num_inference_steps=5),
    "unguided joiner": AudioRequest("rain", seed=23, audio_length=2.0, guidance_scale=1.0, num_inference_steps=4),
    "other length": AudioRequest("a click", seed=24, audio_length=1.0, guidance_scale=1.0, num_inference_steps=2),
}


@pytest.mark.parametrize("join_at", [1, 3])
def test_requests_joining_a_running_loop_get_their_solo_audio(family, join_at):
    results: dict[str, AudioResult] = {}
    loop = StepLoop(family)

    def submit(name: str) -> None:
        loop.submit(JOINING[name], lambda result: results.__setitem__(name, result))

    submit("first")
    for _ in range(join_at):
        loop.step()
    submit("joiner")
    submit("other length")
    loop.step()
    submit("unguided joiner")
    loop.run_until_idle()

    assert results["joiner"].batch_size >= 2 and results["unguided joiner"].batch_size == 3
    for name, request in JOINING.items():
        [alone] = run_to_completion(family, [request])
        assert results[name].error is None, (name, results[name].error)
        assert np.array_equal(results[name].audio, alone.audio), name


SHORT_CLIPS = [  # about a second and less: each request brings the DiT's projections only a few rows
    AudioRequest("a click", seed=31, audio_length=1.0, guidance_scale=1.0, num_inference_steps=3),  # 11 frames
    AudioRequest("a snap", seed=32, audio_length=1.0, guidance_scale=1.0, num_inference_steps=3),
    AudioRequest("a knock", seed=33, audio_length=0.46, negative_prompt="noise", guidance_scale=3.0,
                 num_inference_steps=3),  # 5 frames, 2 rows each
    AudioRequest("a tap", seed=34, audio_length=0.46, guidance_scale=2.0, num_inference_steps=3),
    AudioRequest("a tick", seed=35, audio_length=0.05, guidance_scale=1.0, num_inference_steps=3),  # 1 frame
    AudioRequest("a tock", seed=36, audio_length=0.05, guidance_scale=1.0, num_inference_steps=3),
]


@pytest.fixture(scope="module")
def many_memory_tokens():
    """The tiny model with the published models' 64 memory tokens: every request brings the blocks' Linears enough
    rows to share them, and only the input and output projections see a short clip's few."""
    architecture = replace(TINY_ARCHITECTURE, transformer={**TINY_ARCHITECTURE.transformer, "num_memory_tokens": 64})
    pipe = build_sa3_pipeline(architecture, stochastic_sampling=True, seed=0)
    randomize_zero_initialised(pipe.transformer, gain=0.5)
    return BatchedStableAudio3(place_sa3_pipeline(pipe, torch.device("cpu"), torch.float32, torch.float32),
                               options=WHOLE_DECODE)


@pytest.mark.parametrize("model, shared", [("tiny", [1, 1, 2, 2, 1, 1]), ("64 memory tokens", [2, 2, 2, 2, 2, 2])])
def test_short_clips_get_their_solo_audio_whoever_shares_their_steps(family, many_memory_tokens, model, shared):
    """On CPU a Linear over a few rows rounds otherwise than the same rows in a taller matrix: the projections run
    per request, and a request bringing the blocks too few rows (the tiny model's 4 memory tokens) runs alone."""
    engine = family if model == "tiny" else many_memory_tokens
    results = {}
    loop = StepLoop(engine)
    for index, request in enumerate(SHORT_CLIPS):
        if index % 2:
            loop.step()  # the second of each pair joins the first's run
        loop.submit(request, lambda result, index=index: results.__setitem__(index, result))
    loop.run_until_idle()
    assert [results[index].batch_size for index in range(len(SHORT_CLIPS))] == shared
    for index, request in enumerate(SHORT_CLIPS):
        [alone] = run_to_completion(engine, [request])
        assert results[index].error is None and np.array_equal(results[index].audio, alone.audio), request


def test_every_length_reads_one_rotary_table(family):
    """The DiT's rotary table for any length is the first rows of the longest request's, bit for bit what the DiT
    computes for that length, and takes no memory of its own (one table per length: ~1.1 GB, medium model)."""
    longest = family.rotary_embedding(family.tokens(family.limits.latent_frames))
    for frames in (1, 22, 36, family.limits.latent_frames):
        length = family.tokens(frames)
        table = family.rotary_embedding(length)
        assert torch.equal(table, family.transformer.rotary_pos_emb(length, family.device)), frames
        assert table.untyped_storage().data_ptr() == longest.untyped_storage().data_ptr(), frames


def test_different_seeds_and_prompts_differ(family):
    first, second, third = run_to_completion(family, [
        AudioRequest("rain", seed=1, audio_length=1.0, guidance_scale=1.0, num_inference_steps=2),
        AudioRequest("rain", seed=2, audio_length=1.0, guidance_scale=1.0, num_inference_steps=2),
        AudioRequest("wind", seed=1, audio_length=1.0, guidance_scale=1.0, num_inference_steps=2),
    ])
    assert not np.array_equal(first.audio, second.audio)
    assert not np.array_equal(first.audio, third.audio)


def test_limits_and_defaults_come_from_the_model(families):
    distilled, base = families[TINY_SA3], families[TINY_SA3_BASE]
    assert distilled.limits.sample_rate == 44100 and distilled.limits.channels == 2
    assert distilled.limits.hop_length == 4096
    assert TINY_MAX_SECONDS <= distilled.limits.max_seconds < TINY_MAX_SECONDS + 4096 / 44100
    assert (distilled.default_steps, base.default_steps) == (8, 100)
    assert distilled.default_guidance_scale == base.default_guidance_scale == 1.0
    assert max_seconds_for("stabilityai/stable-audio-3-medium") == 380.0
    assert max_seconds_for("/models/stable-audio-3-small-sfx") == 120.0 and max_seconds_for("elsewhere") is None


def autoencoder_shaped(architecture) -> SimpleNamespace:
    """Only the configuration of an architecture's autoencoder: SAME-L's weights alone are 852 M parameters."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(AutoencoderSAME).parameters.items()}
    return SimpleNamespace(config=SimpleNamespace(**{**defaults, **architecture.vae}))


def test_a_checkpoint_in_a_folder_of_any_name_is_served_to_its_trained_length():
    assert trained_max_seconds("./sa3-medium/", autoencoder_shaped(MEDIUM_ARCHITECTURE)) == 380.0
    assert trained_max_seconds("/models/checkpoint", autoencoder_shaped(SMALL_ARCHITECTURE)) == 120.0
    assert trained_max_seconds("/models/stable-audio-3-medium", autoencoder_shaped(SMALL_ARCHITECTURE)) == 380.0
    assert trained_max_seconds(TINY_SA3, load_tiny_sa3().vae) is None  # its duration embedder's 120 s


def test_requests_the_model_cannot_serve_fail_alone(family):
    offset, too_long, fine = run_to_completion(family, [
        AudioRequest("x", seed=0, audio_length=1.0, audio_start=0.5, guidance_scale=1.0, num_inference_steps=1),
        AudioRequest("x", seed=0, audio_length=family.limits.max_seconds + 1, guidance_scale=1.0,
                     num_inference_steps=1),
        AudioRequest("x", seed=0, audio_length=0.5, guidance_scale=1.0, num_inference_steps=1),
    ])
    assert offset.failure == "server_error" and "audio_start" in offset.error
    assert too_long.failure == "server_error" and "audio_length" in too_long.error
    assert fine.error is None and fine.audio.shape == (2, 22050)


@pytest.mark.parametrize("fill, reason", [(float("nan"), "non-finite"), (0.0, "silence")])
def test_non_finite_or_silent_audio_is_a_failure_not_a_result(family, monkeypatch, fill, reason):
    def decode(latents):
        return SimpleNamespace(sample=torch.full((1, 2, latents.shape[-1] * 4096), fill))

    monkeypatch.setattr(family.vae, "decode", decode)
    [result] = run_to_completion(family, [AudioRequest("x", seed=0, audio_length=0.5, guidance_scale=1.0,
                                                       num_inference_steps=1)])
    assert result.audio is None and result.failure == "server_error" and reason in result.error


def test_half_precision_follows_the_pipeline_and_stays_close_to_fp32(sa3_cache, family):
    """bf16 everywhere: still the pipeline's audio bit for bit (same dtypes at every stage). bf16 DiT and text
    encoder with an fp32 VAE (the GPU layout, which the pipeline itself cannot decode): close to fp32."""
    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32
    request = AudioRequest("a cat meowing", seed=4, audio_length=2.0, negative_prompt="noise", guidance_scale=3.0,
                           num_inference_steps=4)
    all_half = place_sa3_pipeline(StableAudio3Pipeline.from_pretrained(sa3_cache / TINY_SA3), cpu, bf16, bf16)
    [result] = run_to_completion(BatchedStableAudio3(all_half, options=WHOLE_DECODE), [request])
    reference = all_half(request.prompt, duration=request.audio_length, guidance_scale=request.guidance_scale,
                         num_inference_steps=request.num_inference_steps, negative_prompt=request.negative_prompt,
                         generator=torch.Generator().manual_seed(request.seed)).audios[0].float().numpy()
    assert np.array_equal(result.audio, reference)

    served = place_sa3_pipeline(StableAudio3Pipeline.from_pretrained(sa3_cache / TINY_SA3), cpu, bf16, fp32)
    assert served.transformer.rotary_pos_emb.inv_freq.dtype == fp32  # positions counted in fp32
    [low] = run_to_completion(BatchedStableAudio3(served, options=WHOLE_DECODE), [request])
    [full] = run_to_completion(family, [request])
    assert low.error is None and low.audio.shape == full.audio.shape
    assert snr_db(full.audio, low.audio) > 30  # ~50 dB measured


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_frequencies_exact(sa3_cache, pipes, dtype):
    """Placed in fp16 (CUDA's default) or bf16, every component keeps its rotary and Fourier frequencies at their
    fp32 values: the rotary table of a long clip is the fp32 one, and the duration embedding stays within the
    half dtype's rounding of fp32 (rounded frequencies: 9 dB in fp16, 3 dB in bf16; kept: 70 and 52 dB)."""
    cpu, exact = torch.device("cpu"), pipes[TINY_SA3]
    half = place_sa3_pipeline(StableAudio3Pipeline.from_pretrained(sa3_cache / TINY_SA3), cpu, dtype, dtype)
    for name in ("text_encoder", "duration_embedder", "transformer", "vae"):
        buffers = dict(getattr(exact, name).named_buffers())
        for buffer_name, buffer in getattr(half, name).named_buffers():
            if buffer_name.rsplit(".", 1)[-1] in FREQUENCY_BUFFERS:
                assert torch.equal(buffer, buffers[buffer_name]), f"{name}.{buffer_name}"
    assert torch.equal(half.transformer.rotary_pos_emb(1300, cpu), exact.transformer.rotary_pos_emb(1300, cpu))
    seconds = torch.tensor([7.3, 59.0, 119.5])
    assert snr_db(exact.duration_embedder(seconds), half.duration_embedder(seconds).float()) > 40


def test_a_text_encoder_that_overflows_float16_stops_the_start_naming_the_dtype(sa3_cache, pipes):
    """A Gemma-style encoder whose activations exceed fp16's 65504 (here: its embeddings scaled up) makes the
    warm-up's audio non-finite; the start fails with a message that names the cure, where bf16 serves."""
    cpu = torch.device("cpu")
    for dtype, fails in ((torch.float16, True), (torch.bfloat16, False)):
        pipe = place_sa3_pipeline(StableAudio3Pipeline.from_pretrained(sa3_cache / TINY_SA3), cpu, dtype,
                                  torch.float32)
        embeddings = pipe.text_encoder.get_input_embeddings().weight
        # Weights up to 38400 fit fp16, but Gemma scales embeddings by sqrt(width) (5.7 here) past its 65504
        embeddings.data = embeddings.data.float().mul(5e5).to(dtype)
        engine = BatchedStableAudio3(pipe)
        if fails:
            with pytest.raises(ModelLoadError, match="non-finite audio.*STABLE_AUDIO_DTYPE=bfloat16"):
                warm_up(engine)
        else:
            warm_up(engine)


def test_model_names_and_cache_folders(sa3_cache, monkeypatch):
    assert is_sa3_model(TINY_SA3) and is_sa3_model(TINY_SA3_BASE) and is_sa3_model(str(sa3_cache / TINY_SA3))
    assert is_sa3_model("stabilityai/stable-audio-3-medium")
    assert not is_sa3_model("tiny") and not is_sa3_model("stabilityai/stable-audio-open-1.0")
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(sa3_cache))
    assert tiny_sa3_model_dir(TINY_SA3_BASE).parent == sa3_cache


def decode_latents(family: BatchedStableAudio3, seconds: float, window: int | None) -> np.ndarray:
    """The audio of a request's initial noise, decoded in windows of the given size."""
    state = family.prepare_request(AudioRequest("x", seed=1, audio_length=seconds, guidance_scale=1.0,
                                                num_inference_steps=1))
    family.options = SA3Options(window_frames=window)
    return family.decode(state).audio


def test_windowed_decode_is_within_float_rounding_of_the_whole_decode(pipes):
    """A minute of audio (646 latent frames) in windows of two sizes, the last one short; each window takes the
    decoder's reach (1 frame for the tiny model's one-layer decoder) on both sides. One frame less is far off."""
    family = BatchedStableAudio3(pipes[TINY_SA3])
    assert family.options.window_frames == 128  # windowed by default
    assert decoder_reach_frames(family.vae) == family.decode_margin_frames == 1
    whole = decode_latents(family, 60.0, None)
    assert whole.shape == (2, 60 * 44100) and np.abs(whole).max() > 0.01
    for window in (16, 100):
        assert snr_db(whole, decode_latents(family, 60.0, window)) > 100, window  # 132-137 dB measured
    family.decode_margin_frames = 0
    assert snr_db(whole, decode_latents(family, 60.0, 100)) < 60  # 26 dB measured


def test_a_window_spanning_the_clip_is_the_pipelines_decode(pipes, families):
    request = REFERENCE_CASES["distilled, unguided, longer, negative prompt ignored"][1]
    [expected] = run_to_completion(families[TINY_SA3], [request])
    [windowed] = run_to_completion(BatchedStableAudio3(pipes[TINY_SA3], options=SA3Options(window_frames=85)),
                                   [request])
    assert np.array_equal(windowed.audio, expected.audio)  # 84 frames: one window, exactly the whole decode


def parameters(module: torch.nn.Module, leaving_out: str | None = None) -> int:
    return sum(parameter.numel() for name, parameter in module.named_parameters()
               if leaving_out is None or leaving_out not in name)


@pytest.mark.parametrize("architecture, dit, with_inpainting, vae", [
    (MEDIUM_ARCHITECTURE, 1.39e9, 1.45e9, 852e6),
    (SMALL_ARCHITECTURE, 433e6, 459e6, 108e6),
], ids=["medium", "small"])
def test_published_architectures_have_the_published_sizes(architecture, dit, with_inpainting, vae):
    """Counted on the meta device (no memory, no time): the DiT's published size without and with the inpainting
    projections, and its SAME autoencoder's (SAME-L 852 M, SAME-S 108 M)."""
    with torch.device("meta"):
        transformer = StableAudio3DiTModel(**architecture.transformer)
        autoencoder = AutoencoderSAME(**architecture.vae)
    assert parameters(transformer, leaving_out="to_local_embed") == pytest.approx(dit, rel=0.01)
    assert parameters(transformer) == pytest.approx(with_inpainting, rel=0.01)
    assert parameters(autoencoder) == pytest.approx(vae, rel=0.01)


def test_published_architectures_by_name():
    assert published_architecture("stabilityai/stable-audio-3-medium-base") is MEDIUM_ARCHITECTURE
    assert published_architecture("/models/stable-audio-3-small-sfx") is SMALL_ARCHITECTURE
    with pytest.raises(ValueError, match="not a published"):
        published_architecture("stabilityai/stable-audio-3-large")


def test_dummy_small_model_builds_at_full_size():
    """STABLE_AUDIO_LOAD_FORMAT=dummy builds the small model at full size with random weights: ~850 M parameters,
    ~4 GB and ~10 s on 2 cores. No forward: a second of audio through it takes longer than the build."""
    engine = load_sa3_engine(EngineConfig(model="stabilityai/stable-audio-3-small-music-base", load_format="dummy",
                                          device="cpu"))
    assert parameters(engine.transformer, leaving_out="to_local_embed") == pytest.approx(433e6, rel=0.01)
    assert parameters(engine.vae) == pytest.approx(108e6, rel=0.01)
    assert engine.pipe.text_encoder.config.encoder.hidden_size == 768
    assert len(engine.pipe.tokenizer) <= engine.pipe.text_encoder.config.encoder.vocab_size == 256000
    assert (engine.stochastic, engine.default_steps, engine.limits.max_duration_s) == (False, 100, 120.0)
    assert engine.options.window_frames == 128 and engine.decode_margin_frames == 4  # chunked SAME-S
    assert uses_chunked_attention(engine.vae) and engine.vae.decoder.blocks[0].mapping.weight_v.shape[-1] == 3


def test_dummy_needs_a_published_model_and_full_decode_is_an_option(sa3_cache, monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_CACHE", str(sa3_cache))
    with pytest.raises(ModelLoadError, match="not a published"):
        load_sa3_engine(EngineConfig(model="tiny-sa3", load_format="dummy"))
    with pytest.raises(ModelLoadError, match="'auto' or 'dummy'"):
        load_sa3_engine(EngineConfig(model="tiny-sa3", load_format="gguf"))
    whole = load_sa3_engine(EngineConfig(model="tiny-sa3", sampling=SamplingOptions(decode_margin_frames=None)))
    assert whole.options.window_frames is None
