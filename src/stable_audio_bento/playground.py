"""The playground page at /ui: one self-contained HTML file (inline CSS and JS, no build step) that drives the
jobs API from a browser: every request field, progress while the job runs, a player, a waveform and a download."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi.responses import HTMLResponse

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"


@functools.cache
def _html() -> str:
    return PAGE.read_text(encoding="utf-8")


# Not to be framed by another site's page (clickjacking): the key typed into it drives this server.
NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


def playground_page() -> HTMLResponse:
    """The page, read once; ``no-cache`` so a redeployed server's page replaces an old one at the next load."""
    return HTMLResponse(_html(), headers={"Cache-Control": "no-cache", **NOT_FRAMED})
