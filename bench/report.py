"""What the benchmark scripts share: a report printed and saved under bench/results/."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent


class Report:
    """Print lines and keep them in a .tmp file, renamed to its final name at the end."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp") if path else None
        self._file: TextIO | None = None
        if self._tmp is not None:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._tmp.open("w", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self, *, complete: bool) -> None:
        if self._file is None or self._tmp is None or self.path is None:
            return
        self._file.close()
        self._file = None
        if complete:
            self._tmp.replace(self.path)
            print(f"raw output saved to {self.path.relative_to(REPO)}", flush=True)
        else:
            print(f"incomplete run: partial output left in {self._tmp}", flush=True)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_threads(count: int, target: Callable[[int], None], pid: int) -> tuple[float, float]:
    """Run `target(0..count-1)` in `count` threads; return the wall seconds they took
    and the CPU seconds process `pid` (the server under test) used meanwhile."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, cpu_seconds(pid) - cpu0
