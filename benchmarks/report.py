"""How every benchmark script keeps its figures: one JSON report, written after each section (a section that
crashes, or a device call cut off, leaves the earlier sections' figures) and at the end with the total time."""

from __future__ import annotations

import json
import time
from pathlib import Path


def save(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def finish(report: dict, started: float, path: Path) -> None:
    """``started``: ``time.perf_counter()`` when the first section began; the total goes into ``report["meta"]``."""
    report["meta"]["total_s"] = time.perf_counter() - started
    print(f"\ntotal {report['meta']['total_s']:.0f} s", flush=True)
    save(report, path)
