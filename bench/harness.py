"""Load from a separate process, wrk or this file run as a generator of HTTP requests or of
raw pymongo commands (threads); CPU and RSS of servers (psutil)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
    return {k: sum(sum(p.cpu_times()[:2]) for p in processes(pid)) for k, pid in groups.items()}


def _load(got: dict[str, Any], groups: dict[str, int], cpu0: dict[str, float]) -> Load:
    n, cpu = max(1, got["requests"]), cpu_seconds(groups)
    per = {k: 1000 * (cpu[k] - cpu0[k]) / n for k in groups}
    if "cpu" in got:  # the generator's own
        per["client"] = 1000 * got["cpu"] / n
    return Load(
        int(got["requests"]), got["seconds"], int(got["errors"]), got["p50"], got["p99"], per
    )


_LUA = """local reqs, headers, unique, formatted, i, n = {%s}, {%s}, %s, {}, 0, 0
function init(args)
  for k, r in ipairs(reqs) do
    local h = {}
    for name, value in pairs(headers) do h[name] = value end
    if r[3] then h["Content-Type"] = "application/json" end
    formatted[k] = unique and h or wrk.format(r[1], r[2], h, r[3])
  end
end
function request()
  i = i %% #reqs + 1
  if not unique then return formatted[i] end
  n = n + 1
  formatted[i][unique[1]] = unique[2] .. n
  return wrk.format(reqs[i][1], reqs[i][2], formatted[i], reqs[i][3])
end
function done(s, lat, _)
  local e = s.errors
  print(s.requests, s.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
    lat:percentile(50) / 1000, lat:percentile(99) / 1000)
end
"""
KEYS = ("requests", "seconds", "errors", "p50", "p99")  # what wrk's done() prints


def http_load(
    url: str,
    reqs: list[Request],
    conns: int,
    secs: float,
    cpu: dict[str, int],
    headers: Mapping[str, str] | None = None,
    unique: str | None = None,
) -> Load:
    """`reqs` in turn from `conns` connections for `secs`, and the CPU per request of
    the `cpu` process groups (name: pid) meanwhile: wrk, else this file. Every request
    carries `headers` (an Authorization) and, when named, a header `unique` whose value
    no other request of any load has (an Idempotency-Key)."""
    headers = dict(headers or {})
    # A prefix of this load's own, then a request's number within it.
    distinct = (unique, f"bench-{os.urandom(8).hex()}-") if unique else None
    if shutil.which("wrk"):
        # A JSON string of ASCII text is a Lua string literal too.
        rows = ["{" + ",".join(json.dumps(x.decode() if isinstance(x, bytes) else x)
                               for x in r if x) + "}" for r in reqs]  # fmt: skip
        fields = [f"[{json.dumps(k)}]={json.dumps(v)}" for k, v in headers.items()]
        named = "{" + ",".join(map(json.dumps, distinct)) + "}" if distinct else "nil"
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
            lua.write(_LUA % (",".join(rows), ",".join(fields), named))
            lua.flush()
            argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "30s", "-s", lua.name]
            cpu0 = cpu_seconds(cpu)
            out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
        load = _load(dict(zip(KEYS, map(float, out.split()[-5:]), strict=True)), cpu, cpu0)
    else:
        load = generate("http", url, reqs, conns, secs, cpu, headers=headers, unique=distinct)
    # The requests still in flight when the load stops, done before the next run.
    time.sleep(min(conns / max(load.rate, 1), 5))
    return load


def generate(
    kind: str,
    url: str,
    reqs: list[Any],
    conns: int,
    secs: float,
    cpu: dict[str, int],
    *,
    headers: dict[str, str] | None = None,
    unique: tuple[str, str] | None = None,
) -> Load:
    """This file as the load: HTTP `reqs` to `url`, each with `headers` and, if given,
    `unique`'s header set to its prefix and the request's number; or ("mongo")
    `Commands` replayed with raw pymongo against the database `url`, whose own CPU a
    request is "client"."""
    spec = {"kind": kind, "url": url, "reqs": reqs, "conns": conns, "seconds": secs,
            "headers": headers or {}, "unique": unique}  # fmt: skip
    argv = [sys.executable, __file__]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json_util.dumps(spec) + "\n")
        p.stdin.flush()
        p.stdout.readline()  # connected, requests built: the CPU counts from here
        cpu0 = cpu_seconds(cpu)
        p.stdin.close()
        return _load(json.loads(p.stdout.readline()), cpu, cpu0)


def _http(url: str, given: dict[str, str], unique: list[str] | None) -> Callable[[Any], bool]:
    """The fallback's request: a connection each, the least code that works without wrk."""
    numbers = itertools.count(1)

    def send(req: list[Any]) -> bool:
        headers = {"Content-Type": "application/json", **given}
        if unique is not None:
            headers[unique[0]] = f"{unique[1]}{next(numbers)}"
        request = urllib.request.Request(url + req[1], req[2], headers, method=req[0])
        try:
            with urllib.request.urlopen(request, timeout=30):
                return True
        except OSError:  # HTTPError (4xx and 5xx) included
            return False

    return send


def _mongo(client: Any) -> Callable[[Any], bool]:
    def send(req: list[Any]) -> bool:
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

    return send


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "http":
        op = _http(spec["url"], spec["headers"], spec["unique"])
    else:
        from pymongo import MongoClient

        # As the service's client: its writes, its budget (DB_TIMEOUT_MS; mongo_connector).
        op = _mongo(MongoClient(spec["url"], w="majority", journal=True, timeoutMS=3000))
    reqs, order, latencies, errors = spec["reqs"], itertools.count(), list[float](), [0]
    print("ready", flush=True)
    sys.stdin.read()
    cpu0, start = time.process_time(), time.perf_counter()

    def work() -> None:
        while (now := time.perf_counter()) < start + spec["seconds"]:
            errors[0] += not op(reqs[next(order) % len(reqs)])
            latencies.append(1000 * (time.perf_counter() - now))

    threads = [threading.Thread(target=work) for _ in range(spec["conns"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = sorted(latencies) or [0.0]
    return {"requests": len(latencies), "seconds": time.perf_counter() - start,
            "errors": errors[0], "p50": done[len(done) // 2], "p99": done[len(done) * 99 // 100],
            "cpu": time.process_time() - cpu0}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(_run(json_util.loads(sys.stdin.readline()))), flush=True)
