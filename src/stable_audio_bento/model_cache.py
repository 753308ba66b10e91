"""Where the models this project builds itself (the tiny random ones) are kept, and how one is saved exactly once
even when several processes start at the same moment."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .env_values import env_text

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(env_text(os.environ, "STABLE_AUDIO_CACHE") or Path.home() / ".cache" / "stable-audio-bento")


def save_once(directory: Path, build: Callable[[], Any]) -> Path:
    """Builds the pipeline and saves it to ``directory`` unless a complete copy is there; returns the folder. A
    build killed on this host earlier left its staging folder beside it: that is removed first."""
    remove_abandoned_staging(directory.parent, re.escape(directory.name))
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        with written_whole(directory, beside=directory.parent) as staging:
            build().save_pretrained(staging)
    except OSError:
        if not (directory / "model_index.json").is_file():  # not another process finishing first (identical copy)
            raise
    return directory


@contextlib.contextmanager
def written_whole(target: Path, beside: Path) -> Iterator[Path]:
    """A fresh folder under ``beside`` (on ``target``'s file system) to write a model into, renamed to ``target``
    when the block ends without an error, and removed otherwise: a reader never sees half a model, and a killed
    writer leaves only a hidden folder behind, named with its host and PID for ``remove_abandoned_staging``."""
    staging = Path(tempfile.mkdtemp(dir=beside, prefix=f".{target.name}-{socket.gethostname()}-{os.getpid()}-"))
    try:
        yield staging
        staging.chmod(0o755)  # not mkdtemp's 0700: the model may be read by a server run as another user
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed


def remove_abandoned_staging(beside: Path, target_name: str) -> None:
    """Removes the staging folders under ``beside`` that ``written_whole`` made for a target whose name fully
    matches the regular expression ``target_name`` and whose writer is no longer running: one killed (kill -9, an
    OOM kill) left a model-sized folder that nothing else would ever remove. Only this host's folders are looked
    at: a PID means nothing on another (containers sharing one store volume each have their own hostname)."""
    host = re.escape(socket.gethostname())
    staging = re.compile(rf"\.(?:{target_name})-{host}-(\d+)-[a-z0-9_]{{8}}")  # mkdtemp's 8 random characters
    for folder in sorted(beside.iterdir()) if beside.is_dir() else []:
        named = staging.fullmatch(folder.name)
        if named and folder.is_dir() and not _running(int(named[1])):
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("removed %s, left by process %s, which is no longer running", folder, named[1])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    return True
