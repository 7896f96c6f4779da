"""A dependency-free byte progress bar for long jobs (convert, verify), written to stderr.

On a terminal it redraws one line with done/total, rate and ETA; elsewhere (logs, CI) it stays quiet
until the final summary line, so captured output is not flooded with carriage returns.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Track bytes done out of a known total; use as a context manager or call finish()."""

    BAR_WIDTH = 24

    def __init__(
        self,
        total: int,
        label: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        min_interval: float = 0.2,
    ) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.min_interval = min_interval
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.interactive:
            now = time.monotonic()
            if now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self._draw(now)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(fraction * self.BAR_WIDTH)
        rate = self.rate(now)
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {fraction:4.0%} "
            f"{format_bytes(self.done)}/{format_bytes(self.total)} "
            f"{format_bytes(rate)}/s ETA {eta}"
        )
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self, *, ok: bool = True) -> None:
        """End the bar; on success print the summary line (also when not a terminal)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._drawn:
            self.stream.write("\r\x1b[K")
        if ok:
            self.stream.write(
                f"{self.label}: {format_bytes(self.done)} in {now - self.start:.1f} s "
                f"({format_bytes(self.rate(now))}/s)\n"
            )
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(ok=exc_type is None)
