"""rpc-ps: a PyTorch RPC parameter server, as in PyTorch's parameter-server tutorials.

One process (RPC name ``ps``, rank 0) holds each model's parameters and a
``torch.optim.SGD(lr=0.01, momentum=0.9)`` behind a lock. A worker (ranks 1..N, the bench's
worker processes) calls ``rpc_sync("ps", ps_step, args=(model, grads))``: the PS applies the
step and returns the updated parameters. This is the tutorials' ``update_and_fetch_model``
with a batch of one (every push is applied on arrival, like the service's async mode).

The bench runs it as two systems, each with its own RPC group (a process joins one only):
``rpc-ps`` with TensorPipe's defaults (on one host it picks its shared-memory transport and
cross-memory-attach channel), and ``rpc-ps-tcp`` with ``transport="tcp"``, the TCP transport
(``uv``) and the basic channel, which is what workers on other hosts would use.

What makes it a fair peer: the TensorPipe backend as a user would set it up; the RPC group is
set up once per run, so steps do no setup; the step is a module-level function (no RRef to pickle per call); the
gradients go as tensors (TensorPipe sends their storage, no pickling of the data); and the
PS returns copies of the parameters made under the lock, the cheapest way to return the
values *of this step* when other workers step concurrently.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed.rpc as rpc

PS_NAME = "ps"
TRANSPORTS = ("default", "tcp")


def transport_options(transport: str) -> dict[str, Any]:
    """The TensorPipe options that choose the transport (none: TensorPipe's own choice)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"rpc transport must be one of {TRANSPORTS}, got {transport!r}")
    return {"_transports": ["uv"], "_channels": ["basic"]} if transport == "tcp" else {}


def backend_options(port: int, transport: str, timeout: float) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}",
        rpc_timeout=timeout,
        num_worker_threads=16,
        **transport_options(transport),
    )


def worker_name(index: int) -> str:
    return f"worker{index}"


# -- the parameter server's side ------------------------------------------------------------------


@dataclass
class _Model:
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.SGD
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[str, _Model] = {}


def ps_create(model: str, values: list[torch.Tensor], lr: float, momentum: float) -> None:
    """Create (or replace) a model with these initial values."""
    params = [torch.nn.Parameter(v.clone()) for v in values]
    _MODELS[model] = _Model(params, torch.optim.SGD(params, lr=lr, momentum=momentum))


def ps_delete(model: str) -> None:
    _MODELS.pop(model, None)


def ps_step(model: str, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply one SGD step with one gradient per parameter; return the updated parameters."""
    m = _MODELS[model]
    with m.lock:
        for p, g in zip(m.params, grads, strict=True):
            p.grad = g
        m.optimizer.step()
        return [p.detach().clone() for p in m.params]


def ps_step_some(model: str, indices: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply one SGD step to some parameters only (``SGD.step`` skips those whose grad is None)."""
    m = _MODELS[model]
    with m.lock:
        chosen = [m.params[i] for i in indices]
        for p, g in zip(chosen, grads, strict=True):
            p.grad = g
        m.optimizer.step()
        out = []
        for p in chosen:
            p.grad = None
            out.append(p.detach().clone())
        return out


def ps_main(port: int, world_size: int, transport: str, timeout: float, conn: Connection) -> None:
    """The PS process: join the RPC group as rank 0 and serve until every worker has shut down."""
    import warnings

    from .agent import fast_exit, warm_torch

    warnings.filterwarnings("ignore", message="You are using a Backend")  # a deprecation inside init_rpc
    warm_torch()
    conn.send(
        {
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "transport": transport,
            "backend_options": transport_options(transport),
        }
    )
    options = backend_options(port, transport, timeout)
    rpc.init_rpc(PS_NAME, rank=0, world_size=world_size, rpc_backend_options=options)  # type: ignore[no-untyped-call]
    conn.send({"ready": True})
    rpc.shutdown()  # graceful: returns once every worker has called shutdown too
    conn.close()
    fast_exit()


# -- a worker's side ---------------------------------------------------------------------------------


def worker_init(index: int, port: int, world_size: int, transport: str, timeout: float) -> None:
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        worker_name(index),
        rank=index + 1,
        world_size=world_size,
        rpc_backend_options=backend_options(port, transport, timeout),
    )


def worker_shutdown() -> None:
    rpc.shutdown()
