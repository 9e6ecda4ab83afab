"""Run every benchmark, one after the other: `make bench`.

Each script prints its figures and saves its raw output under bench/results/;
bench/README.md says how to read them. `make bench QUICK=1` makes short runs that only
print, so they never replace the recorded full runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# oplog_growth.py (300,000 writes a server, about 25 minutes) runs on its own.
BENCHMARKS = ["email_throughput.py", "serving.py", "durability.py", "inbox.py", "streams.py"]


def main() -> int:
    quick = os.environ.get("QUICK", "") not in ("", "0") or "--quick" in sys.argv[1:]
    failed = []
    for script in BENCHMARKS:
        argv = [sys.executable, str(HERE / script), *(["--quick", "--no-save"] if quick else [])]
        print(f"\n=== {script} {'(quick)' if quick else ''}", flush=True)
        if subprocess.run(argv, cwd=HERE.parent).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
