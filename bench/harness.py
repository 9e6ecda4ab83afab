"""Load from a separate process, wrk or this file run as a generator of HTTP requests or of
raw pymongo commands (threads, keep-alive); CPU and RSS of servers (psutil)."""

from __future__ import annotations

import functools
import http.client
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from bson import ObjectId, json_util

Request = tuple[str, str, bytes | None]  # method, path, JSON body
Commands = tuple[bool, list[tuple[str, dict[str, Any]]]]  # in a transaction?, (db, command)s


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_ms: dict[str, float]  # CPU ms a request of each watched process group

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def processes(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def rss_mb(pid: int) -> list[float]:
    return [p.memory_info().rss / 2**20 for p in processes(pid)]


def cpu_seconds(groups: dict[str, int]) -> dict[str, float]:
    return {
        name: sum(sum(p.cpu_times()[:2]) for p in processes(pid)) for name, pid in groups.items()
    }


def _load(got: dict[str, Any], groups: dict[str, int], cpu0: dict[str, float]) -> Load:
    n, cpu = got["requests"], cpu_seconds(groups)
    per = {k: 1000 * (cpu[k] - cpu0[k]) / max(1, n) for k in groups}
    if "cpu" in got:  # the generator's own
        per["client"] = 1000 * got["cpu"] / max(1, n)
    return Load(n, got["seconds"], got["errors"], got["p50"], got["p99"], per)


_LUA = """local reqs, formatted, i = {%s}, {}, 0
function init(args)
  for k, r in ipairs(reqs) do
    formatted[k] = wrk.format(r[1], r[2], r[3] and {["Content-Type"] = "application/json"}, r[3])
  end
end
function request() i = i %% #formatted + 1; return formatted[i] end
function done(s, lat, _)
  local e = s.errors
  io.write(string.format('{"requests": %%d, "seconds": %%f, "errors": %%d, "p50": %%f, '
    .. '"p99": %%f}\\n', s.requests, s.duration / 1e6, e.connect + e.read + e.write + e.status
    + e.timeout, lat:percentile(50) / 1000, lat:percentile(99) / 1000))
end
"""


def http_load(url: str, reqs: list[Request], conns: int, secs: float, cpu: dict[str, int]) -> Load:
    """`reqs` in turn from `conns` connections for `secs`, and the CPU per request of
    the `cpu` process groups (name: pid) meanwhile: wrk, else this file."""
    if not shutil.which("wrk"):
        return generate("http", url, reqs, conns, secs, cpu)
    # A JSON string of ASCII text is a Lua string literal too.
    rows = [
        ",".join(json.dumps(x.decode() if isinstance(x, bytes) else x) for x in r if x)
        for r in reqs
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(_LUA % ",".join("{" + row + "}" for row in rows))
        lua.flush()
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "30s", "-s", lua.name, url]
        cpu0 = cpu_seconds(cpu)
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    load = _load(json.loads(out.splitlines()[-1]), cpu, cpu0)
    time.sleep(min(load.p99_ms, 5000) / 1000)  # what wrk left in flight, done before the next
    return load


def generate(
    kind: str, url: str, reqs: list[Any], conns: int, secs: float, cpu: dict[str, int]
) -> Load:
    """This file as the load: HTTP `reqs` to `url`, or ("mongo") `Commands` replayed with
    raw pymongo against the database `url`, whose own CPU a request is "client"."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        spec = {"kind": kind, "url": url, "reqs": reqs, "conns": conns, "seconds": secs}
        file.write(json_util.dumps(spec))
        file.flush()
        argv = [sys.executable, __file__, file.name]
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
            assert p.stdin is not None and p.stdout is not None
            p.stdout.readline()  # connected, requests built: the CPU counts from here
            cpu0 = cpu_seconds(cpu)
            p.stdin.close()
            return _load(json.loads(p.stdout.readline()), cpu, cpu0)


def _http(url: str) -> Callable[[Any], bool]:
    conn = http.client.HTTPConnection(urlsplit(url).hostname or "", urlsplit(url).port)

    def send(req: list[Any]) -> bool:
        try:
            conn.request(req[0], req[1], req[2], {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status < 400
        except (OSError, http.client.HTTPException):
            conn.close()
            return False

    return send


def _mongo(client: Any, req: list[Any]) -> bool:
    in_transaction, commands = req
    for _, command in commands:  # each document a fresh _id, as the service gives it
        for doc in command.get("documents", ()):
            doc["_id"] = ObjectId()

    def run(session: Any = None) -> bool:
        return all(client[db].command(c, session=session) for db, c in commands)

    try:
        if not in_transaction:
            return run()
        with client.start_session() as session:
            return bool(session.with_transaction(run))
    except Exception:  # an error, as an HTTP 5xx is
        return False


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "http":
        ops = [_http(spec["url"]) for _ in range(spec["conns"])]
    else:
        from pymongo import MongoClient

        # As the service's client: its writes, its budget (DB_TIMEOUT_MS; mongo_connector).
        client: Any = MongoClient(spec["url"], w="majority", journal=True, timeoutMS=3000)
        ops = [functools.partial(_mongo, client)] * spec["conns"]
    reqs, order, latencies, errors = spec["reqs"], itertools.count(), list[float](), [0]
    print("ready", flush=True)
    sys.stdin.read()
    cpu0, start = time.process_time(), time.perf_counter()

    def work(op: Callable[[Any], bool]) -> None:
        while (now := time.perf_counter()) < start + spec["seconds"]:
            errors[0] += not op(reqs[next(order) % len(reqs)])
            latencies.append(1000 * (time.perf_counter() - now))

    threads = [threading.Thread(target=work, args=(op,)) for op in ops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = sorted(latencies) or [0.0]
    got = {"requests": len(latencies), "seconds": time.perf_counter() - start, "errors": errors[0],
           "p50": statistics.median(done), "p99": done[int(len(done) * 0.99)]}  # fmt: skip
    return got | ({"cpu": time.process_time() - cpu0} if spec["kind"] == "mongo" else {})


if __name__ == "__main__":
    print(json.dumps(_run(json_util.loads(Path(sys.argv[1]).read_text()))), flush=True)
