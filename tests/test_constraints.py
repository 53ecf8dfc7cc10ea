"""constraints.txt pins every package the project installs, and the tests run on exactly those versions.

scripts/install and the Dockerfile install with ``-c constraints.txt``, so CI and the image get the
versions the last change was tested with, whatever was released upstream since. These tests fail when
a dependency is added to pyproject.toml without a pin, when the install pulls in a package the file
does not pin (or no longer pulls in one it pins), and when an installed version differs from its pin
(an install that skipped the file).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
NOT_PINNED = {"momentum-service"}  # the project itself (installed editable)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and ";" not in line, f"constraints.txt: not an exact pin: {line!r}"
        assert canonical(name) not in out, f"constraints.txt: {name} pinned twice"
        out[canonical(name)] = version
    return out


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return [Requirement(r) for r in requirements]


def applies(req: Requirement, extras: frozenset[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras})


def needed() -> set[str]:
    """Every package that installing the project with all its extras pulls in here (the requirements of the
    installed distributions, followed with the extras asked of each)."""
    todo = [(canonical(r.name), frozenset(r.extras)) for r in declared() if applies(r, frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done or name in NOT_PINNED:
            continue  # (the project naming itself with extras: those extras are in declared() already)
        done.add((name, extras))
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if applies(req, extras):
                todo.append((canonical(req.name), frozenset(req.extras)))
    return {name for name, _ in done}


def test_every_dependency_of_the_project_and_its_extras_is_pinned() -> None:
    missing = sorted({canonical(r.name) for r in declared()} - NOT_PINNED - set(pins()))
    assert not missing, f"in pyproject.toml but not in constraints.txt: {missing} (see its header)"


def test_every_package_the_install_pulls_in_is_pinned_at_its_installed_version() -> None:
    pinned, wanted = pins(), needed()
    unpinned = sorted(wanted - set(pinned))
    assert not unpinned, f"installed with the project but not pinned in constraints.txt: {unpinned}"
    stale = sorted(set(pinned) - wanted)
    assert not stale, f"pinned in constraints.txt, but nothing installs them any more: {stale}"
    installed = {n: importlib.metadata.version(n) for n in wanted}
    # (==2.13.0 admits 2.13.0+cpu, the local CPU wheel: a pin without a local label matches any.)
    differ = {n: (installed[n], pinned[n]) for n in wanted if installed[n] not in SpecifierSet(f"=={pinned[n]}")}
    assert not differ, f"installed version differs from its pin (installed, pinned; run scripts/install): {differ}"


def test_a_version_that_differs_from_its_pin_is_caught() -> None:
    # The negative control of the comparison above.
    assert "2.13.1" not in SpecifierSet("==2.13.0")
    assert "2.13.0+cpu" in SpecifierSet("==2.13.0")
