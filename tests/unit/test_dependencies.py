"""pyproject's dependency bounds: no upper bound on torch, a reason beside every other one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
UPPER = re.compile(r"<|~=|==")


def _requirements() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower(): dep for dep in deps}


def test_torch_has_no_upper_bound():
    # A cap makes pip downgrade a newer torch already installed (a user's GPU build).
    assert not UPPER.search(_requirements()["torch"]), _requirements()["torch"]


def test_every_upper_bound_gives_its_reason_beside_it():
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    capped = [dep for dep in _requirements().values() if UPPER.search(dep)]
    assert capped == ["transformers>=5.14,<5.26"]
    for dep in capped:
        index = next(i for i, line in enumerate(lines) if f'"{dep}"' in line)
        above = []
        for line in reversed(lines[:index]):
            if not line.strip().startswith("#"):
                break
            above.append(line)
        reason = " ".join([lines[index].partition("#")[2], *above])
        assert "5.25" in reason and "because" in reason, (dep, reason)


def test_ci_installs_the_cpu_torch_first_then_the_newest_allowed():
    script = (ROOT / ".ci" / "run").read_text()
    newest = script.split("== oldest allowed")[0]
    torch_at = newest.index('pip install --quiet "torch==2.13.0"')
    package_at = newest.index('pip install --quiet -e ".[test,docs]"')
    assert torch_at < package_at
    # the newest run constrains nothing beyond pyproject's bounds
    assert "-c " not in newest and "==" not in newest[package_at:]
