"""How many threads torch computes with while serving: chosen by timing decode steps, again and again.

PyTorch splits a matmul over OpenMP threads that wait for each other at its end, spinning. When another process
takes one of the cores (a build, a browser tab), the thread that shares a core with it runs half the time and every
matmul waits for it: on 2 cores one stream beside a one-core busy loop keeps well under half its quiet speed, while
one thread keeps its own core and runs as fast busy as quiet. Passive waiting (`OMP_WAIT_POLICY=PASSIVE`) keeps the
busy speed but halves the quiet one, and a short spin (`GOMP_SPINCOUNT`) trades quiet speed for busy speed
(`bench/busy_bench.py`; the runs are in bench/README.md). So the count is measured
while serving: now and then the worker runs a few steps at another count and moves to it when they are faster by a
margin than the steps just before at the current count (see ThreadTuner); on a quiet machine the probes come further
and further apart and cost a small share of the steps. `--threads N` fixes the count instead.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def candidates(most: int) -> list[int]:
    """Thread counts worth trying on `most` cores: all of them, one fewer (one taken by another process), half, one."""
    return sorted({most, max(1, most - 1), max(1, most // 2), 1}, reverse=True)


@dataclass
class ThreadTuner:
    """Picks the intra-op thread count from the speed of the decode steps around a probe. Runs on the worker.

    A probe runs `probe` steps at another count and wins when their median takes under `margin` of the median of
    the last `window` steps at the current count with as many rows. Probes come `every` seconds of decoding apart,
    twice as far after each lost one (up to `longest`: on a quiet machine they cost almost nothing), and at once
    when the median step at the current count slows down by `slowdown` against the fastest seen at that batch size
    (another process just took a core). Steps that follow a prefill in the same engine step are not counted: the
    prefill's work leaves them slower, which says nothing of the thread count."""

    most: int
    fixed: bool = False  # --threads: never probe
    every: float = 2.0  # seconds of decoding between probes, after a won one
    longest: float = 60.0
    probe: int = 3  # steps a probe runs at the other count
    window: int = 5  # steps at the current count a probe is measured against
    margin: float = 0.8  # a probe's median must take at most this fraction of the current count's to win
    slowdown: float = 1.3
    current: int = field(init=False)
    _wait: float = field(init=False)  # seconds of decoding until the next probe
    _trying: int | None = field(default=None, init=False)  # the count a probe runs at, while it does
    _recent: list[tuple[int, float]] = field(default_factory=list, init=False)  # (rows, seconds) at `current`
    _best: dict[int, float] = field(default_factory=dict, init=False)  # rows → fastest median step at `current`
    _probed: list[float] = field(default_factory=list, init=False)
    _rows: int = field(default=0, init=False)
    _next: int = field(default=0, init=False)  # which candidate the next probe tries
    _since: float = field(default=0.0, init=False)  # decoding seconds since the last probe

    def __post_init__(self) -> None:
        self.current, self._wait = self.most, self.every
        torch.set_num_threads(self.most)

    def before_decode(self, rows: int) -> None:
        """Set the count for the next decode step of `rows` rows (a probe's, or the current one)."""
        if self.fixed or self._trying is not None or self._since < self._wait or len(self._same(rows)) < self.probe:
            return
        others = [n for n in candidates(self.most) if n != self.current]
        if not others:
            return
        self._trying, self._rows, self._probed = others[self._next % len(others)], rows, []
        self._next += 1
        torch.set_num_threads(self._trying)

    def after_decode(self, rows: int, seconds: float, clean: bool = True) -> None:
        """Record a decode step's time (`clean`: no prefill ran before it in the same engine step); end a probe once
        it has its steps."""
        if self.fixed:
            return
        self._since += seconds
        if self._trying is None:
            if not clean:
                return
            self._recent = [*self._recent, (rows, seconds)][-self.window :]
            same = self._same(rows)[-self.probe :]
            if len(same) == self.probe:
                now = statistics.median(same)
                best = self._best.setdefault(rows, now)
                if now > self.slowdown * best:  # slower than this count ran it: probe now
                    self._since = self._wait
                self._best[rows] = min(best, now)
            return
        if rows != self._rows or not clean:  # the batch changed, or a prefill ran: the probe compares with nothing
            self._end_probe(won=False, before=0.0)
            return
        self._probed.append(seconds)
        if len(self._probed) < self.probe:
            return
        before = statistics.median(self._same(rows)) if self._same(rows) else 0.0
        self._end_probe(bool(before) and statistics.median(self._probed) < self.margin * before, before)

    def _same(self, rows: int) -> list[float]:
        return [s for r, s in self._recent if r == rows]

    def _end_probe(self, won: bool, before: float) -> None:
        trying, self._trying, self._since = self._trying, None, 0.0
        if won and trying is not None:
            log.info("computing with %d threads from now on (faster than %d in the last probe)", trying, self.current)
            self.current, self._recent, self._best, self._wait = trying, [], {}, self.every
        else:
            self._wait = min(self.longest, 2 * self._wait)
            if before:  # what the current count does now is the bar a slowdown is measured against
                self._best[self._rows] = before
        torch.set_num_threads(self.current)

    def describe(self) -> dict[str, object]:
        return {"threads": self.current, "most": self.most, "tuned": not self.fixed}
