"""Where the models this project builds itself (the tiny random ones) are kept, and how one is saved exactly once
even when several processes start at the same moment."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .env_values import env_text


def cache_root() -> Path:
    return Path(env_text(os.environ, "STABLE_AUDIO_CACHE") or Path.home() / ".cache" / "stable-audio-bento")


def save_once(directory: Path, build: Callable[[], Any]) -> Path:
    """Builds the pipeline and saves it to ``directory`` unless a complete copy is there; returns the folder. The
    copy is written beside it and renamed into place, so a reader never sees half a model."""
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        build().save_pretrained(staging)
        staging.chmod(0o755)  # not mkdtemp's 0700: the cache may be shared with a server run as another user
        staging.rename(directory)
    except OSError:
        if not (directory / "model_index.json").is_file():  # not another process finishing first (identical copy)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    return directory
