"""The files that install the service agree with each other."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from notification_service.__main__ import GRACEFUL_SECONDS

ROOT = Path(__file__).resolve().parent.parent


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_requirements_txt_matches_pyproject_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(_requirement_lines(ROOT / "requirements.txt")) == sorted(project["dependencies"])


def test_every_config_variable_is_documented_once_in_readme_and_env_example() -> None:
    source = (ROOT / "notification_service" / "config.py").read_text()
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()

    names = sorted(set(re.findall(r'r\.\w+\(\s*"([A-Z_]+)"', source)))
    assert len(names) > 30
    for name in names:
        assert readme.count(f"| `{name}` |") == 1, f"{name} not in the README's table once"
        assert len(re.findall(rf"^#? ?{name}=", example, re.M)) == 1, (
            f"{name} not in .env.example once"
        )


# --- the lock the Dockerfile installs ---------------------------------------------------

LOCK = ROOT / "requirements.lock"


def _lock_entries(text: str) -> dict[str, tuple[Version, list[str], list[str]]]:
    """Each locked package's canonical name -> (version, hashes, `# via` sources)."""
    entries: dict[str, tuple[Version, list[str], list[str]]] = {}
    current: str | None = None
    for line in text.splitlines():
        if pin := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+) \\", line):
            current = canonicalize_name(pin[1])
            entries[current] = (Version(pin[2]), [], [])
        elif current is not None and (digest := re.fullmatch(r"\s+--hash=(sha256:\w+).*", line)):
            entries[current][1].append(digest[1])
        elif current is not None and (via := re.fullmatch(r"\s+#\s+(?:via\s+)?(\S.*)", line)):
            entries[current][2].append(via[1].strip())
    return entries


def _lock_problems(dependencies: list[str], lock_text: str) -> list[str]:
    """What keeps `lock_text` from installing `dependencies` as pyproject.toml says."""
    entries = _lock_entries(lock_text)
    problems = []
    for dependency in dependencies:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        if name not in entries:
            problems.append(f"{name} is not locked")
        elif not requirement.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{name}=={entries[name][0]} is outside {requirement.specifier}")
    # uv marks what requirements.txt asked for; anything else is some package's need.
    direct = {name for name, (_, _, via) in entries.items() if "-r requirements.txt" in via}
    wanted = {canonicalize_name(Requirement(d).name) for d in dependencies}
    problems += [f"{name} is locked but no longer a dependency" for name in sorted(direct - wanted)]
    return problems


def test_every_runtime_dependency_is_locked_at_a_version_it_allows() -> None:
    assert _lock_problems(_pyproject()["dependencies"], LOCK.read_text()) == [], (
        "requirements.lock is out of date: run `make lock`"
    )


def test_a_dependency_added_removed_or_moved_without_relocking_is_caught() -> None:
    dependencies = _pyproject()["dependencies"]
    text = LOCK.read_text()
    assert _lock_problems([*dependencies, "tenacity>=8"], text) == ["tenacity is not locked"]
    flask = re.search(r"^flask==(\S+) \\$", text, re.M)
    assert flask
    moved = text.replace(flask[0], "flask==2.3.3 \\")
    assert _lock_problems(dependencies, moved) == ["flask==2.3.3 is outside <4,>=3.0"]
    without_granian = [d for d in dependencies if not d.startswith("granian")]
    assert _lock_problems(without_granian, text) == ["granian is locked but no longer a dependency"]


def test_every_locked_package_is_pinned_with_hashes() -> None:
    text = LOCK.read_text()
    entries = _lock_entries(text)
    pins = [ln for ln in text.splitlines() if ln and not ln[0].isspace() and ln[0] != "#"]
    assert len(pins) == len(entries) > len(_pyproject()["dependencies"])
    for name, (_, hashes, via) in entries.items():
        assert hashes, f"{name} has no hash: pip --require-hashes would refuse the lock"
        assert via, f"{name} has no `# via`: not written by make lock?"


# --- the Dockerfile, compose and .dockerignore agree with the lock and the config ---------


def _pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())
    lines = (ln.strip() for ln in text.splitlines())
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1])
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def _makefile_variable(name: str) -> str:
    found = re.search(rf"^{name}\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert found, f"{name} not set in the Makefile"
    return found[1]


def test_the_dockerfile_installs_the_lock_with_hashes_and_the_package_without_deps() -> None:
    runs = [args for op, args in _dockerfile_instructions() if op == "RUN"]
    copies = [args.split() for op, args in _dockerfile_instructions() if op == "COPY"]
    lock_name = _makefile_variable("LOCK")
    assert lock_name == LOCK.name
    assert any(lock_name in sources[:-1] for sources in copies)
    installs = [
        " ".join(cmd.split()) for run in runs for cmd in run.split("&&") if "pip install" in cmd
    ]
    # Every pip install in the image: the lock, hash-checked, then the package alone.
    assert len(installs) == 2, installs
    assert re.search(rf"--require-hashes\b.*--no-deps\b.*-r {re.escape(lock_name)}$", installs[0])
    assert re.search(r"--no-deps \.$", installs[1])
    assert "requirements.txt" not in " ".join(runs)


def test_the_base_image_is_pinned_to_the_python_the_lock_is_made_for() -> None:
    base = next(args for op, args in _dockerfile_instructions() if op == "FROM")
    pinned = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", base)
    assert pinned, f"FROM {base}: a full version, so a rebuild gets the same Python"
    assert f"{pinned[1]}.{pinned[2]}" == _makefile_variable("LOCK_PYTHON")
    assert SpecifierSet(_pyproject()["requires-python"]).contains(f"{pinned[1]}.{pinned[2]}")


def test_the_build_context_keeps_what_the_dockerfile_copies_and_leaves_out_local_state() -> None:
    patterns = [
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = [
        source
        for op, args in _dockerfile_instructions()
        if op == "COPY"
        for source in args.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"{source} is ignored"
    for local in (".venv", "var", ".env", ".git"):
        assert local in patterns


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def test_compose_images_are_pinned_and_the_service_images_built_from_the_dockerfile() -> None:
    services = _compose()["services"]
    built = {name for name, s in services.items() if "build" in s}
    assert built == {"app", "worker"}
    for name in built:
        assert services[name]["build"] == "."
    for name, service in services.items():
        if name in built:
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"


def test_compose_sets_only_variables_the_service_reads() -> None:
    source = (ROOT / "notification_service" / "config.py").read_text()
    known = set(re.findall(r'r\.\w+\(\s*"([A-Z_]+)"', source))
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name} sets {unknown}, which config.py does not read"
    port = next(args for op, args in _dockerfile_instructions() if op == "EXPOSE")
    app = _compose()["services"]["app"]
    assert f"{port}:{port}" in app["ports"]
    assert f"127.0.0.1:{port}/ready" in " ".join(app["healthcheck"]["test"])


def test_compose_publishes_the_api_only_with_a_key_from_its_env_file() -> None:
    # The image listens on 0.0.0.0, so the service refuses to start without a key; compose
    # must ask for one rather than publish an open relay.
    app = _compose()["services"]["app"]
    assert app["environment"]["API_KEYS"] == "${API_KEYS:?set API_KEYS in .env}"
    assert "ALLOW_UNAUTHENTICATED" not in app["environment"]


def test_the_scale_profile_runs_a_worker_and_lets_the_web_service_turn_its_dispatchers_off() -> (
    None
):
    services = _compose()["services"]
    assert services["worker"]["profiles"] == ["scale"]
    assert services["worker"]["command"][-1] == "worker"
    assert services["app"]["environment"]["DISPATCHER_THREADS"] == "${DISPATCHER_THREADS:-1}"


def _seconds(duration: str) -> float:
    """A compose duration (`40s`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_lets_a_stopping_service_drain_before_it_is_killed() -> None:
    # Docker SIGKILLs 10 s after SIGTERM unless told otherwise: shorter than granian's
    # graceful timeout, so requests and sends in flight would be cut.
    services = _compose()["services"]
    for name in ("app", "worker"):
        grace = _seconds(services[name].get("stop_grace_period", "10s"))
        assert grace >= GRACEFUL_SECONDS + 5, f"{name}: stop_grace_period {grace:g}s"
    assert _seconds("1m30s") == 90 and _seconds("500ms") == 0.5
