"""The base install is the client only: a worker needs numpy and httpx, not the server stack."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from .helpers import ROOT


def test_base_dependencies_are_client_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip().lower() for dep in project["dependencies"]}
    assert names == {"numpy", "httpx", "safetensors"}
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
