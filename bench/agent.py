"""A bench worker process: it runs one system's step loop when the orchestrator says so.

The orchestrator starts the worker processes once per run (each joins at most one RPC group,
once, and keeps one SDK client per server) and drives them over a pipe with commands:

- ``setup`` (worker 0 only): create the cell's model on the system, with its initial values;
- ``prepare``: build what the steps need (gradients, the step function), check the first
  step's result when one worker runs alone, then warm up;
- ``go``: wait until the common start instant, run timed steps until the time budget is spent
  (and at least ``min_steps`` are done, within a hard cap), report every step's latency;
- ``cancel``: drop a prepared step (another worker failed to prepare);
- ``teardown`` (worker 0 only): delete the model;
- ``stop``: leave the RPC group and exit.

Every command is answered with ``{"ok": ...}`` or ``{"error": traceback}``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .workloads import F32, LR, MOMENTUM, Workload

SYSTEMS = ("torch-local", "rpc-ps", "rpc-ps-tcp", "service-redis", "service-redis-flush", "service-embedded")
FLUSH_MS = 100
"""service-redis-flush (by default): the same service on the same Redis, its models with ``{"durability":
{"flush_ms": 100}}`` (acknowledged from the owner's memory, the log in Redis within 100 ms); service-redis
has ``"step"``. ``--flush-ms`` changes it."""
RPC_TRANSPORTS = {"rpc-ps": "default", "rpc-ps-tcp": "tcp"}
"""The RPC systems: the same parameter server, each in its own RPC group with this TensorPipe transport."""
SERVICE_TIMEOUT_S = 600.0
"""The SDK client's timeout: long, so a slow wire format shows as slow steps, not as retried timeouts."""

Step = Callable[[], object]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    index: int
    service_urls: dict[str, str]
    rpc_system: str | None = None
    """The RPC system whose group this process joins (a process can join one only); its port and size:"""
    rpc_port: int = 0
    rpc_world_size: int = 0
    rpc_timeout: float = 600.0
    torch_threads: int = 1
    warm_torch: bool = True
    flush_ms: int = FLUSH_MS


@dataclass(frozen=True, slots=True)
class LoopSpec:
    seconds: float
    min_steps: int
    max_steps: int
    hard_cap: float


def run_loop(step: Step, start_at: float, spec: LoopSpec) -> tuple[list[float], float]:
    """Run ``step`` from ``start_at`` (``time.monotonic``) until ``spec.seconds`` have passed and at least
    ``spec.min_steps`` are done, but never past ``spec.hard_cap`` seconds once one step is done, nor past
    ``spec.max_steps``. Returns each step's latency (s) and the monotonic instant of the end."""
    delay = start_at - time.monotonic()
    if delay > 0.002:
        time.sleep(delay - 0.002)
    while time.monotonic() < start_at:
        pass
    deadline = start_at + spec.seconds
    cap = start_at + spec.hard_cap
    latencies: list[float] = []
    clock = time.perf_counter
    while len(latencies) < spec.max_steps:
        now = time.monotonic()
        if now >= deadline and (len(latencies) >= spec.min_steps or now >= cap):
            break
        t = clock()
        step()
        latencies.append(clock() - t)
    return latencies, time.monotonic()


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.clients: dict[str, Any] = {}
        self.rpc_ready = False
        self.prepared: Step | None = None

    # -- systems ------------------------------------------------------------------------------------

    def client(self, system: str) -> Any:
        if system not in self.clients:
            from momentum_client import Client

            self.clients[system] = Client(self.config.service_urls[system], timeout=SERVICE_TIMEOUT_S)
        return self.clients[system]

    def check_rpc(self, system: str) -> None:
        """An RPC system's calls go to this process's one RPC group: it must be that system's."""
        if system in RPC_TRANSPORTS and system != self.config.rpc_system:
            raise RuntimeError(f"{system}: this worker joined the RPC group of {self.config.rpc_system}")

    def setup(self, system: str, workload: Workload, model: str) -> dict[str, Any]:
        init = workload.initial()
        self.check_rpc(system)
        if system.startswith("service-"):
            c = self.client(system)
            durability = {"flush_ms": self.config.flush_ms} if system == "service-redis-flush" else None
            c.create_model(model, lr=LR, momentum=MOMENTUM, durability=durability)
            c.init_params(model, init)
        elif system in RPC_TRANSPORTS:
            import torch
            import torch.distributed.rpc as rpc

            from .rpc_ps import PS_NAME, ps_create

            values = [torch.from_numpy(v) for v in init.values()]
            rpc.rpc_sync(PS_NAME, ps_create, args=(model, values, LR, MOMENTUM))
        return {}

    def teardown(self, system: str, model: str) -> dict[str, Any]:
        if system.startswith("service-"):
            self.client(system).delete_model(model)
        elif system in RPC_TRANSPORTS:
            import torch.distributed.rpc as rpc

            from .rpc_ps import PS_NAME, ps_delete

            rpc.rpc_sync(PS_NAME, ps_delete, args=(model,))
        return {}

    def make_step(self, system: str, workload: Workload, model: str, grads: dict[str, F32]) -> Step:
        """The step function, and what it returns: the updated parameters, in any array form."""
        names = list(grads)
        self.check_rpc(system)
        if system == "torch-local":
            if workload.singles:
                raise ValueError("torch-local has no requests to batch: the batching comparison skips it")
            import torch

            params = [torch.nn.Parameter(torch.from_numpy(v)) for v in workload.initial().values()]
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
            tgrads = [torch.from_numpy(g) for g in grads.values()]

            def local_step() -> list[torch.Tensor]:
                for p, g in zip(params, tgrads, strict=True):
                    p.grad = g
                opt.step()
                return [p.detach() for p in params]

            return local_step
        if system in RPC_TRANSPORTS:
            import torch
            import torch.distributed.rpc as rpc

            from .rpc_ps import PS_NAME, ps_step, ps_step_some

            tgrads = [torch.from_numpy(g) for g in grads.values()]
            if workload.singles:
                singles = [([i], [g]) for i, g in enumerate(tgrads)]

                def rpc_singles() -> list[list[torch.Tensor]]:
                    return [rpc.rpc_sync(PS_NAME, ps_step_some, args=(model, i, g)) for i, g in singles]

                return rpc_singles

            def rpc_step() -> list[torch.Tensor]:
                result: list[torch.Tensor] = rpc.rpc_sync(PS_NAME, ps_step, args=(model, tgrads))
                return result

            return rpc_step
        c = self.client(system)
        if workload.singles:
            single = [{name: grads[name]} for name in names]

            def service_singles() -> list[dict[str, Any]]:
                return [c.step(model, g) for g in single]

            return service_singles

        def service_step() -> dict[str, Any]:
            result: dict[str, Any] = c.step(model, grads)
            return result

        return service_step

    def prepare(self, system: str, workload: Workload, model: str, workers: int, warmup: LoopSpec) -> dict[str, Any]:
        grads = workload.gradients(self.config.index)
        step = self.make_step(system, workload, model, grads)
        out: dict[str, Any] = {}
        if self.config.index == 0 and system.startswith("service-"):
            out["wire"], first = self.probe_wire(system, step)
        else:
            first = step()
        if workers == 1:
            check_first_step(workload, grads, first)
        latencies, _ = run_loop(step, time.monotonic(), warmup)
        out["warmup_steps"] = len(latencies) + 1
        self.prepared = step
        return out

    def probe_wire(self, system: str, step: Step) -> tuple[dict[str, Any], object]:
        """Run the first step noting what the SDK sent and received (around the client's one send method)."""
        seen: dict[str, Any] = {}
        client = self.client(system)
        send = client._send

        def noting(request: Any) -> Any:
            seen["request_content_type"] = request.headers.get("Content-Type")
            seen["request_accept"] = request.headers.get("Accept")
            seen["request_bytes"] = request.length
            response = send(request)
            seen["response_content_type"] = response.headers.get("content-type")
            seen["response_bytes"] = int(response.headers.get("content-length", -1))
            return response

        client._send = noting
        try:
            first = step()
        finally:
            del client._send  # the class's method again
        return seen, first

    def go(self, start_at: float, spec: LoopSpec) -> dict[str, Any]:
        step, self.prepared = self.prepared, None
        if step is None:
            raise RuntimeError("go without prepare")
        cpu0 = time.process_time()
        latencies, end = run_loop(step, start_at, spec)
        return {"latencies": latencies, "end": end, "cpu_s": time.process_time() - cpu0}

    # -- the command loop ------------------------------------------------------------------------

    def serve(self, conn: Connection) -> None:
        while True:
            command, kwargs = conn.recv()
            if command == "stop":
                conn.send({"ok": {}})
                return
            try:
                if command == "cancel":
                    self.prepared = None
                    result: dict[str, Any] = {}
                else:
                    result = getattr(self, command)(**kwargs)
                conn.send({"ok": result})
            except Exception:
                conn.send({"error": traceback.format_exc()})


def check_first_step(workload: Workload, grads: dict[str, F32], result: object) -> None:
    """A system's first step from the initial values must give ``p - lr * g`` (velocity starts as g)."""
    init = workload.initial()
    if isinstance(result, dict):
        values = [np.asarray(result[name]) for name in init]
    elif isinstance(result, list) and result and isinstance(result[0], list):  # rpc singles: one list per request
        values = [np.asarray(r[0]) for r in result]
    elif isinstance(result, list) and result and isinstance(result[0], dict):  # service singles
        values = [np.asarray(r[name]) for r, name in zip(result, init, strict=True)]
    else:
        values = [np.asarray(v) for v in result]  # type: ignore[attr-defined]
    for (name, p0), got in zip(init.items(), values, strict=True):
        want = p0 - np.float32(LR) * grads[name]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-7):
            raise AssertionError(f"{name}: the first step's result is not p - lr * g")


def warm_torch() -> None:
    """One throwaway SGD step: the first ``optimizer.step()`` imports a lot of torch lazily (seconds)."""
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    torch.optim.SGD([p], lr=LR, momentum=MOMENTUM).step()


def agent_main(config: AgentConfig, conn: Connection) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="You are using a Backend")  # a deprecation inside init_rpc
    torch.set_num_threads(config.torch_threads)
    if config.warm_torch:
        warm_torch()
    agent = Agent(config)
    try:
        if config.rpc_system is not None:
            from .rpc_ps import worker_init

            transport = RPC_TRANSPORTS[config.rpc_system]
            worker_init(config.index, config.rpc_port, config.rpc_world_size, transport, config.rpc_timeout)
            agent.rpc_ready = True
        conn.send({"ok": {"pid": os.getpid()}})
    except Exception:
        conn.send({"error": traceback.format_exc()})
        return
    try:
        agent.serve(conn)
    finally:
        for c in agent.clients.values():
            c.close()
        if agent.rpc_ready:
            from .rpc_ps import worker_shutdown

            worker_shutdown()
    fast_exit()


def fast_exit() -> None:
    """Exit now: the interpreter's teardown with torch loaded takes seconds, and there is nothing left to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
