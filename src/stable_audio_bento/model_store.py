"""The served model in BentoML's model store: its tag, what an imported model records, and which one the engine
serves. ``bentoml build`` packs the declared model into the Bento (``models/``), and ``bentoml containerize`` bakes
it into the image, where the Bento's own model store answers the same tag."""

from __future__ import annotations

import os
from dataclasses import replace

import bentoml

from .config import EngineConfig

STORED_MODEL_NAME = "stable-audio"
STORED_MODEL_TAG = f"{STORED_MODEL_NAME}:latest"
FAMILIES = {"StableAudioPipeline": "stable-audio-open", "StableAudio3Pipeline": "stable-audio-3"}


def stored_model_reference() -> bentoml.models.BentoModel | None:
    """The model to declare on the engine service: the store's latest ``stable-audio``, or None when the store has
    none. BentoML resolves a declared model when it builds (a missing one fails the build, as it then asks
    BentoCloud) and when the service starts; with None a Bento is built without weights and serving works as
    before."""
    reference = bentoml.models.BentoModel(STORED_MODEL_TAG)
    return reference if reference.stored is not None else None


def serving_config(stored: bentoml.Model | None) -> EngineConfig:
    """The environment's configuration, serving the stored model unless ``STABLE_AUDIO_MODEL`` names another."""
    config = EngineConfig.from_env()
    if stored is None or os.environ.get("STABLE_AUDIO_MODEL"):
        return config
    return replace(config, model=stored.info.metadata["source"], weights=stored.path, model_tag=str(stored.tag))
