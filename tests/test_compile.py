"""``STABLE_AUDIO_COMPILE``: what torch.compile gets from either family is the whole DiT forward as one graph that
computes from its inputs alone. A tensor built inside it (the rotary embedding, once) is arithmetic on the host: on a
GPU, Inductor then generates and compiles CPU code for it, which is how the first compiled run on an H200 stalled."""

from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from stable_audio_bento.config import EngineConfig
from stable_audio_bento.generation import AudioRequest
from stable_audio_bento.pipeline import BatchedStableAudio
from stable_audio_bento.sa3 import BatchedStableAudio3
from stable_audio_bento.sa3_loading import TINY_MAX_SECONDS, load_tiny_sa3


def holds_tensor(argument) -> bool:
    """A node whose value is a tensor, or a tuple or list of some."""
    return isinstance(argument, Node) and any(
        isinstance(value, torch.Tensor) for value in tree_leaves(argument.meta.get("example_value")))


def tensors_made_from_nothing(graph: GraphModule) -> list[str]:
    """Operations that produce a tensor from no tensor (arange, ones, tensor, ...): constants the graph builds."""
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function" and holds_tensor(node)
            and not any(holds_tensor(argument) for argument in tree_leaves((node.args, node.kwargs)))]


def captured_graphs(engine, requests: list[AudioRequest]) -> list[GraphModule]:
    """The graphs torch.compile hands its backend for one batched forward of ``requests``, run as they are."""
    graphs = []

    def backend(graph: GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    engine._transformer_forward = torch.compile(engine.transformer_forward, dynamic=True, backend=backend)
    try:
        engine.forward([engine.prepare_request(request) for request in requests])
    finally:
        engine._transformer_forward = engine.transformer_forward
        torch._dynamo.reset()
    return graphs


@pytest.fixture(scope="module")
def sa3_family():
    return BatchedStableAudio3(load_tiny_sa3(), TINY_MAX_SECONDS)


@pytest.mark.parametrize("family_name", ["stable-audio-open", "stable-audio-3"])
def test_the_compiled_dit_forward_is_one_graph_of_its_inputs(family_name, tiny_pipe, sa3_family):
    engine = BatchedStableAudio(tiny_pipe) if family_name == "stable-audio-open" else sa3_family
    requests = [AudioRequest("rain on a tin roof", seed=1, audio_length=3.0, num_inference_steps=4),
                AudioRequest("a cello", seed=2, audio_length=3.0, guidance_scale=1.0, num_inference_steps=4)]
    graphs = captured_graphs(engine, requests)
    assert len(graphs) == 1  # no graph break
    assert tensors_made_from_nothing(graphs[0]) == []


def test_the_compiled_engine_predicts_what_the_eager_one_does(tiny_pipe):
    """Inductor on CPU (its C++ backend): the same noise predictions to float32 rounding, for guided and unguided
    requests in one forward."""
    eager, compiled = BatchedStableAudio(tiny_pipe), BatchedStableAudio(tiny_pipe)
    compiled.compile("default")
    requests = [AudioRequest("rain on a tin roof", seed=1, audio_length=3.0, num_inference_steps=4),
                AudioRequest("a cello", seed=2, audio_length=3.0, guidance_scale=1.0, num_inference_steps=4)]
    torch._dynamo.utils.counters.clear()
    try:
        expected = eager.forward([eager.prepare_request(request) for request in requests])
        got = compiled.forward([compiled.prepare_request(request) for request in requests])
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled_graphs >= 1  # the forward did go through the compiler
    for want, have in zip(expected, got):
        assert have.shape == want.shape
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("value", "mode"), [("0", None), ("", None), ("1", "default"),
                                             ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_the_setting_names_a_torch_compile_mode(monkeypatch, value, mode):
    monkeypatch.setenv("STABLE_AUDIO_COMPILE", value)
    assert EngineConfig.from_env().compile == mode


def test_an_unknown_compile_setting_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("STABLE_AUDIO_COMPILE", "yes")
    with pytest.raises(ValueError, match="STABLE_AUDIO_COMPILE='yes'.*reduce-overhead"):
        EngineConfig.from_env()
