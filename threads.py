"""How many threads torch computes with while serving: chosen by timing decode steps, again and again.

PyTorch splits a matmul over OpenMP threads that wait for each other at its end, spinning. When another process
takes one of the cores (a build, a browser tab), the thread that shares a core with it runs half the time and every
matmul waits for it: one stream of the bundled model on 2 cores measured 64 tokens/s quiet and 18 beside a one-core
busy loop (0.29x), while one thread keeps its own core and ran 50 quiet and 50 busy (`bench/busy_bench.py`; the
README has the runs). Passive waiting (`OMP_WAIT_POLICY=PASSIVE`) keeps the busy speed but halves the quiet one
(30 tokens/s), and a short spin (`GOMP_SPINCOUNT=1000`) gives up 14% quiet for 0.51x busy. So the count is measured
while serving: every `every` seconds of decoding the worker runs `probe` steps at another count and moves to it when
they are faster by a margin than the steps just before at the current count; on a quiet machine the probes cost
under 1% of the steps. `--threads N` fixes the count instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def candidates(most: int) -> list[int]:
    """Thread counts worth trying on `most` cores: all of them, one fewer (one taken by another process), half, one."""
    return sorted({most, max(1, most - 1), max(1, most // 2), 1}, reverse=True)


@dataclass
class ThreadTuner:
    """Picks the intra-op thread count from the speed of the decode steps around a probe. Runs on the worker."""

    most: int
    fixed: bool = False  # --threads: never probe
    every: float = 2.0  # seconds of decoding between probes
    probe: int = 3  # steps a probe runs at the other count
    margin: float = 0.9  # a probe must take at most this fraction of the current count's time to win
    current: int = field(init=False)
    _trying: int | None = field(default=None, init=False)  # the count a probe runs at, while it does
    _recent: list[tuple[int, float]] = field(default_factory=list, init=False)  # (rows, seconds) at `current`
    _probed: list[float] = field(default_factory=list, init=False)
    _rows: int = field(default=0, init=False)
    _next: int = field(default=0, init=False)  # which candidate the next probe tries
    _since: float = field(default=0.0, init=False)  # decoding seconds since the last probe

    def __post_init__(self) -> None:
        self.current = self.most
        torch.set_num_threads(self.most)

    def before_decode(self, rows: int) -> None:
        """Set the count for the next decode step of `rows` rows (a probe's, or the current one)."""
        if self.fixed or self._trying is not None or self._since < self.every or len(self._recent) < self.probe:
            return
        others = [n for n in candidates(self.most) if n != self.current]
        if not others:
            return
        self._trying, self._rows, self._probed = others[self._next % len(others)], rows, []
        self._next += 1
        torch.set_num_threads(self._trying)

    def after_decode(self, rows: int, seconds: float) -> None:
        """Record a decode step's time; end a probe once it has its steps."""
        if self.fixed:
            return
        self._since += seconds
        if self._trying is None:
            self._recent = (
                [*self._recent[-(self.probe - 1) :], (rows, seconds)] if self.probe > 1 else [(rows, seconds)]
            )
            return
        if rows != self._rows:  # the batch changed under the probe: its steps compare with nothing
            self._end_probe(won=False)
            return
        self._probed.append(seconds)
        if len(self._probed) < self.probe:
            return
        before = [s for r, s in self._recent if r == rows]
        won = bool(before) and sum(self._probed) / len(self._probed) < self.margin * sum(before) / len(before)
        self._end_probe(won)

    def _end_probe(self, won: bool) -> None:
        trying, self._trying, self._since = self._trying, None, 0.0
        if won and trying is not None:
            log.info("computing with %d threads from now on (faster than %d in the last probe)", trying, self.current)
            self.current, self._recent = trying, []
        torch.set_num_threads(self.current)

    def describe(self) -> dict[str, object]:
        return {"threads": self.current, "most": self.most, "tuned": not self.fixed}
