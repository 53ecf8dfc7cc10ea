"""``momentum-service checkpoint save|load|list``: what an operator runs, against a real server process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import momentum_client as mc
import numpy as np
import pytest

from .helpers import ROOT, ServerProcess


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess().start()
    yield proc
    proc.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "momentum_service", "checkpoint", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_save_delete_load_and_list(server: ServerProcess, tmp_path: Path) -> None:
    with mc.Client(server.url) as client:
        client.create_model("cli-m", lr=0.1, momentum=0.9, schedule={"type": "step", "step_size": 2})
        client.init_params("cli-m", {"w": np.arange(4, dtype=np.float32)})
        for _ in range(3):
            client.step("cli-m", {"w": np.ones(4, np.float32)})
        before = client.get_param_state("cli-m", "w")
        path = tmp_path / "cli-m.safetensors"

        r = cli("save", "--url", server.url, "cli-m", str(path))
        assert r.returncode == 0, r.stderr
        assert "saved model 'cli-m' (1 parameters)" in r.stdout and path.stat().st_size > 0

        client.delete_model("cli-m")
        r = cli("load", "--url", server.url, "cli-m", str(path))
        assert r.returncode == 0, r.stderr
        assert "1 parameters, step 3" in r.stdout
        after = client.get_param_state("cli-m", "w")
        assert (after.value.tobytes(), after.velocity.tobytes(), after.step) == (  # type: ignore[union-attr]
            before.value.tobytes(),
            before.velocity.tobytes(),  # type: ignore[union-attr]
            before.step,
        )
        assert client.get_model("cli-m").schedule["type"] == "step"

        r = cli("load", "--url", server.url, "--no-replace", "cli-m", str(path))
        assert r.returncode == 1 and "exists" in r.stderr

        r = cli("list", "--url", server.url)
        assert r.returncode == 0 and "cli-m\tpytorch\tasync\t1 params\tstep 3" in r.stdout

    r = cli("save", "--url", server.url, "no-such-model", str(tmp_path / "x.safetensors"))
    assert r.returncode == 1 and "not found" in r.stderr.lower()
    assert not (tmp_path / "x.safetensors").exists()
    r = cli("load", "--url", server.url, "m2", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 1 and "No such file" in r.stderr
