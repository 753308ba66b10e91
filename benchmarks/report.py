"""How every benchmark script ends: its total time printed, then its figures written as one JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path


def finish(report: dict, started: float, path: Path) -> None:
    """``started``: ``time.perf_counter()`` when the first section began; the total goes into ``report["meta"]``."""
    report["meta"]["total_s"] = time.perf_counter() - started
    print(f"\ntotal {report['meta']['total_s']:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
