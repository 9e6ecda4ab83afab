"""A measured figure: one value per interleaved round, reported as median (min..max)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Figure:
    section: str  # "6. Email"
    name: str  # "dispatcher / smtplib"
    unit: str  # "emails/s", "ratio", "ms"
    goal: str = ""  # "≥ 0.8", stated beside the figure; empty when there is none
    met: Callable[[float], bool] | None = None  # applied to the median
    note: str = ""  # why a goal is missed, where the time goes
    rounds: list[float] = field(default_factory=list)
    load: list[tuple[float, float]] = field(default_factory=list)  # 1-min load before, after
    # What the figure is made of, one value a round, shown beside it: "service req/s".
    detail: dict[str, list[float]] = field(default_factory=dict)

    def add(self, measure: Callable[[], float]) -> float:
        """Run one round of `measure`, keeping its value and the load around it."""
        before = os.getloadavg()[0]
        self.rounds.append(measure())
        self.load.append((before, os.getloadavg()[0]))
        return self.rounds[-1]

    def part(self, name: str) -> float:
        return statistics.median(self.detail[name])

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def verdict(self) -> str:
        if self.met is None or not self.rounds:
            return ""
        return "met" if self.met(self.median) else "missed"
