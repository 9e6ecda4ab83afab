"""What the benchmark scripts share: a report printed and saved under bench/results/."""

from __future__ import annotations

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
