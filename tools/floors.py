"""The declared floor of every dependency finegrain installs with ``.[dev]``, as pip constraints.

    python tools/floors.py [pyproject.toml] > floors.txt
    pip install -e ".[dev]" -c floors.txt

Reads ``[project.dependencies]`` and the optional dependencies that ``dev`` pulls in (following
``finegrain[...]`` self-references) and prints ``name==V`` for each ``name>=F``, where V is the
oldest release at or above F that the registry serves (``pip index versions``; F itself when the
lookup fails, so pip reports it). ``torch`` and ``torchvision`` are left out on purpose (see
tools/check_floor.sh): pip then takes the release the machine serves.
Used by tools/check_floor.sh; tested in tests/test_floors.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# Not pinned to their floors: old torch releases are multi-GB downloads (see check_floor.sh).
UNPINNED = {"torch", "torchvision"}
REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def _name(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()


def requirements(pyproject: dict, extra: str = "dev") -> list[str]:
    """The project's dependencies plus those of ``extra`` (self-references followed)."""
    project = pyproject["project"]
    own = _name(project["name"])
    optional = project.get("optional-dependencies", {})
    out, todo, seen = list(project.get("dependencies", [])), [extra], set()
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        for req in optional.get(group, []):
            name, extras, _ = REQ.match(req).groups()
            if _name(name) == own:
                todo += [e.strip() for e in (extras or "[]")[1:-1].split(",") if e.strip()]
            else:
                out.append(req)
    return out


def floor(req: str) -> tuple[str, str | None]:
    """(name, declared floor or None) of a requirement such as ``timm>=1.0  # comment``."""
    name, _, spec = REQ.match(req.split("#")[0].split(";")[0]).groups()
    m = re.search(r">=\s*([0-9][^,\s]*)", spec)
    return _name(name), (m.group(1) if m else None)


def _key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", v))


def oldest_at_least(available: list[str], lowest: str) -> str:
    """The oldest final release in ``available`` that is >= ``lowest`` (``lowest`` if none)."""
    final = [v for v in available if re.fullmatch(r"[0-9]+(\.[0-9]+)*", v)]
    pad = lambda v: _key(v) + (0,) * (6 - len(_key(v)))  # noqa: E731 - 1.0 == 1.0.0
    ok = sorted((v for v in final if pad(v) >= pad(lowest)), key=pad)
    return ok[0] if ok else lowest


def available_versions(name: str) -> list[str]:
    """Releases the registry serves (``pip index versions``); empty when it cannot tell."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    m = re.search(r"Available versions:\s*(.+)", out)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def constraints(pyproject: dict) -> list[str]:
    lines = []
    for req in requirements(pyproject):
        name, low = floor(req)
        if low is None or name in UNPINNED:
            continue
        lines.append(f"{name}=={oldest_at_least(available_versions(name), low)}")
    return lines


def main(argv: list[str]) -> int:
    import tomllib

    path = Path(argv[0] if argv else "pyproject.toml")
    print("\n".join(constraints(tomllib.loads(path.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
