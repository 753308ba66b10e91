"""The served model in BentoML's model store: its tag, what an imported model records, and which one the engine
serves. ``bentoml build`` packs the declared model into the Bento (``models/``), and ``bentoml containerize`` bakes
it into the image, where the Bento's own model store answers the same tag."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer

from .config import EngineConfig

logger = logging.getLogger(__name__)

STORED_MODEL_NAME = "stable-audio"
STORED_MODEL_TAG = f"{STORED_MODEL_NAME}:latest"
FAMILIES = {"StableAudioPipeline": "stable-audio-open", "StableAudio3Pipeline": "stable-audio-3"}


def stored_model_reference() -> bentoml.models.BentoModel | None:
    """The model to declare on the engine service: the store's latest ``stable-audio``, or None when the store has
    none. BentoML resolves a declared model when it builds (a missing one fails the build, as it then asks
    BentoCloud) and when the service starts; with None a Bento is built without weights and serving works as
    before. It is declared by its version: BentoML resolving ``latest`` itself lists the store when that file is
    missing, and stops at an unreadable entry."""
    stored = latest_stored_model()
    return None if stored is None else bentoml.models.BentoModel(stored.tag)


def serving_config(stored: bentoml.Model | None) -> EngineConfig:
    """The environment's configuration, serving the stored model unless ``STABLE_AUDIO_MODEL`` names another."""
    config = EngineConfig.from_env()
    if stored is None or os.environ.get("STABLE_AUDIO_MODEL"):
        return config
    return replace(config, model=stored.info.metadata["source"], weights=stored.path, model_tag=str(stored.tag))


def store_folder() -> Path:
    """The model store in use (tests patch it); BentoML gives its folder no public name."""
    return Path(BentoMLContainer.model_store.get()._path)


def latest_file() -> Path:
    """Where BentoML keeps the name of ``stable-audio``'s latest version; it has no call to read or set it."""
    return store_folder() / STORED_MODEL_NAME / "latest"


def latest_stored_model() -> bentoml.Model | None:
    """The store's ``stable-audio:latest``: the version its ``latest`` file names or, that file missing or naming
    no readable entry, the newest readable one (what BentoML would write there)."""
    stored = {model.tag.version: model for model in stored_models()}
    latest = latest_file()
    named = latest.read_text().strip() if latest.is_file() else None
    return stored.get(named) or max(stored.values(), key=lambda model: model.creation_time, default=None)


def stored_models() -> list[bentoml.Model]:
    """Every readable version of ``stable-audio`` in the store that records its source. BentoML's own listing
    (``bentoml.models.list``) raises at the first entry it cannot read, such as a folder without model.yaml (left by
    an older importer killed while writing, or by anything else): that would stop every import, and the service's
    start even when it serves another model. Such an entry is skipped, and named with how to remove it; so is one
    without a source (another tool's), which the service could not serve."""
    folder = store_folder() / STORED_MODEL_NAME
    entries = sorted(entry for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else []
    return [model for model in map(_readable, entries) if model is not None]


def _readable(entry: Path) -> bentoml.Model | None:
    try:
        model = BentoMLContainer.model_store.get().get(bentoml.Tag(STORED_MODEL_NAME, entry.name))
    except Exception as unreadable:  # noqa: BLE001 - a missing model.yaml, one cut short (YAMLError), without a field
        # (KeyError), a folder name that is no version (ValueError): whatever it is, this entry cannot be served
        logger.warning("skipping %s in BentoML's model store: %s. It cannot be served; remove it with `rm -r %s` "
                       "(`bentoml models list` fails until then)", entry, unreadable, entry)
        return None
    if "source" not in model.info.metadata:  # stored by another tool, or its model.yaml edited: nothing to serve
        logger.warning("skipping %s in BentoML's model store: its metadata records no source, so it was not stored by "
                       "stable-audio-import-model and cannot be served; remove it with `bentoml models delete %s`",
                       model.tag, model.tag)
        return None
    return model
