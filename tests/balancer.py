"""HAProxy as a process in front of server replicas, with the deployment's own configuration.

:class:`HAProxyProcess` runs ``haproxy -db -f deploy/haproxy.cfg`` (the file docker-compose.cluster.yml
mounts, used as it is): the listening address and the three replicas' addresses are the environment
variables that file reads (``MOMENTUM_BIND``, ``MOMENTUM_1`` .. ``MOMENTUM_3``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .helpers import ROOT, free_port, terminate, wait_until

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
BACKENDS = 3  # the server lines of deploy/haproxy.cfg


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).is_file()), None
    )


class HAProxyProcess:
    """HAProxy in the foreground (``-db``) on a free loopback port, balancing over ``backends``
    (``http://host:port`` URLs, as many as the configuration's server lines)."""

    def __init__(self, backends: list[str]) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed; scripts/install installs it (apt-get install haproxy)")
        if len(backends) != BACKENDS:
            raise ValueError(f"{HAPROXY_CFG} balances over {BACKENDS} replicas, got {len(backends)}")
        self.binary = binary
        self.port = free_port()
        self.backends = backends
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MOMENTUM_BIND": f"127.0.0.1:{self.port}"}
        for i, url in enumerate(backends, start=1):
            parts = urlsplit(url)
            self.env[f"MOMENTUM_{i}"] = f"{parts.hostname}:{parts.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="momentum-haproxy-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HAProxyProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(HAPROXY_CFG)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
            )

        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                return True  # exited: reported below
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

        try:
            wait_until(ready, timeout=20, what="haproxy and a replica behind it")
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log()}")
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
