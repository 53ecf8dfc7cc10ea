"""The base install is the client only: a worker needs numpy and httpx, not the server stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .helpers import ROOT


def test_base_dependencies_are_client_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]}
    assert names == {"numpy", "httpx"}
    server = {dep.split(">")[0].split("[")[0].lower() for dep in project["optional-dependencies"]["server"]}
    assert {"fastapi", "uvicorn", "pydantic", "pydantic-settings", "redis"} <= server
    assert "torch==2.13.0" in project["optional-dependencies"]["dev"]


def test_importing_the_client_loads_no_server_module() -> None:
    code = (
        "import sys, momentum_client\n"
        "heavy = {'fastapi', 'starlette', 'redis', 'uvicorn', 'pydantic', 'momentum_service', 'torch'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serving_without_the_server_extra_says_what_to_install() -> None:
    """The `momentum-service` command of a client-only install: one line, no traceback."""
    code = (
        "import sys\n"
        "sys.modules['uvicorn'] = None  # as in a client-only install\n"
        "from momentum_service.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        "momentum-service: serving needs the server extra, which is not installed (uvicorn is missing): "
        "pip install 'momentum-service[server]'"
    ]


@pytest.mark.slow
def test_a_client_only_install_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """`pip install .`: the SDK and its two dependencies, no server stack, no build warnings."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir", "--verbose", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert "SetuptoolsDeprecationWarning" not in pip.stdout + pip.stderr
    python = str(venv / "bin" / "python")
    check = "import momentum_client, importlib.util as u; assert u.find_spec('fastapi') is None"
    subprocess.run([python, "-c", check], check=True, timeout=60)
    out = subprocess.run([str(venv / "bin" / "momentum-service"), "serve"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "momentum-service[server]" in out.stderr
