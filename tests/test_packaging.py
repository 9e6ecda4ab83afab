"""The files that install the service agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
