"""``torch.optim.SGD`` whose updates a momentum-service server applies (:class:`RemoteSGD`), and
checkpoints converted to and from torch's ``state_dict`` pair (:func:`to_torch`, :func:`from_torch`).

A training loop changes in the optimizer line only::

    import torch
    from momentum_client.torch import RemoteSGD

    optimizer = RemoteSGD(net.parameters(), lr=0.1, momentum=0.9, model="cnn", url="http://localhost:8000")
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

The server's ``pytorch`` rule computes ``torch.optim.SGD``'s update bit for bit (CPU, float32 and
float64), so the parameters, the momentum buffers (:meth:`RemoteSGD.state_dict`) and everything
computed from them (BatchNorm's running statistics, which stay local) are bitwise those of
``torch.optim.SGD`` on CPU with the same arguments, parameter groups and learning-rate scheduler.
This module imports torch; ``import momentum_client`` never does (torch is the optional ``torch``
extra: ``pip install momentum-service[torch]``).

**Construction** connects: it creates the model on the server if it is missing (``create=True``),
with the optimizer's defaults as the model's hyperparameters and one server parameter group per
torch parameter group (named ``"0"``, ``"1"``, ... by index, listing the group's parameters, with
every hyperparameter of the group), uploads the values of the parameters the server does not have
yet, and copies the server's values into the parameters in place. So several workers may start at
once and all continue from the same values, and a worker that joins a model trained elsewhere
computes its first gradient on the server's values. An existing model must have the same rule and
mode (``ValueError`` otherwise) and a constant server-side schedule (the lr is set from here); its
parameter groups are set to this optimizer's. Parameters must be float32 or float64 (on any
device), dense, each in the optimizer once.

**Names.** A parameter is named on the server by its real name when the optimizer is given names
(``net.named_parameters()``, or groups of ``(name, tensor)`` pairs: torch then keeps
``param_names``), else by its position, ``"0"``, ``"1"``, ..., as ``state_dict()`` numbers it.
Workers that share a model must build it with the same parameters in the same groups.

**A step** (:meth:`RemoteSGD.step`; a closure runs first, under ``torch.enable_grad()``, and its
loss is returned) sends the gradient of every parameter that has one in one request, then copies
each parameter's new value into it in place (``param.copy_``, under ``torch.no_grad()``; CUDA
parameters are copied to and from the CPU). Parameters whose ``.grad`` is ``None`` are not sent
and do not change, as with torch. Gradients travel in their parameter's dtype, except that a
float16 or bfloat16 gradient of a float32 parameter (``param.grad_dtype = torch.bfloat16``) travels
as is, at half the bytes, and the server widens it exactly; a narrower float gradient of a float64
parameter is widened here, exactly. (``torch.optim.SGD`` itself keeps such a gradient's dtype for its
momentum buffer, so there it computes otherwise: the server's update is torch's on the widened
gradient.)

**Hyperparameters and schedulers.** Before each step, the hyperparameters of every group (``lr``,
``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``) are compared with what
the server has (as last sent or seen); if any differ, one ``update_model(groups={"<i>": {...}})``
request carries all the changes, then the step follows. So ``torch.optim.lr_scheduler`` works
unchanged, and so does code that writes ``group["lr"]``: a ``StepLR`` costs one more request
at each milestone, ``OneCycleLR`` (lr and momentum) or ``CosineAnnealingLR`` one more per step.
A Python float travels through JSON exactly, so the server uses exactly ``group["lr"]``.

**Values changed outside the optimizer.** The values live on the server: a step computes the new
value from the server's, and overwrites the local one. A parameter changed in place since the
optimizer last wrote it (``net.load_state_dict(...)`` after the optimizer was built, an in-place
init or clamp) would silently lose the change, so :meth:`RemoteSGD.step` raises ``RuntimeError``
instead (the change is seen by the tensor's version counter, which ``param.data`` writes bypass).
``optimizer.load_state_dict(optimizer.state_dict())`` sends the local values, keeping the
momentum buffers and steps.

**state_dict.** :meth:`RemoteSGD.state_dict` is ``torch.optim.SGD``'s: ``{"state": {i:
{"momentum_buffer": tensor}}, "param_groups": [...]}``, the buffers fetched from the server in one
request (a checkpoint); it loads into ``torch.optim.SGD`` and back, bitwise. The buffers also stay
in ``optimizer.state`` as of that call (the live ones are on the server). :meth:`RemoteSGD.
load_state_dict` restores the hyperparameters and buffers, and sends them with the parameters'
current local values in one checkpoint (``load_checkpoint``): restore the model's ``state_dict``
first. A parameter without a buffer in the state dict gets none, so its next update starts the
buffer from the gradient, as torch's does; one with a buffer continues it. The server keeps each
parameter's step count (torch's SGD has none). The checkpoint replaces the model whole: do it
while no other worker steps (other parameters of the model are kept).

**Several workers.** In ``mode="async"`` (the default) each step is applied on arrival, on the
values as they are then. In ``mode="sync"`` with ``workers=N``, each worker passes its ``rank``
(0..N-1); a step is sent with ``worker_id=rank`` and ``base_step`` (the step its gradients were
computed at: the one the server last returned), and the server applies the mean of the N
gradients once (summed in rank order, then divided by N) and returns the same values to every
worker: what ``DistributedDataParallel`` with ``torch.optim.SGD`` computes, the update with the
mean gradient, without a process group. Bitwise, it is ``torch.optim.SGD`` given the server's mean,
``(g_0 + g_1 + ...) / N``; DDP's all-reduce rounds its mean its own way (where it divides, and the
backend's order of additions). Every worker must send the same parameters at every step (as DDP
requires). In ``mode="bounded"``
(``max_staleness=s``) steps are sent with ``base_step`` and refused when more than ``s`` steps
stale. Workers share one set of hyperparameters per group: give them the same scheduler, or the
last one to change a hyperparameter wins (and each change is one more request).

**Other rules.** ``rule="keras"``, ``"tf1"``, ``"ema"`` or ``"previous_delta"`` train with that
rule's update instead (see the server's docs); the groups then carry that rule's hyperparameters
only (the others must keep their neutral values: no dampening, weight decay, nesterov or maximize
where the rule has none), and ``momentum_buffer`` is that rule's velocity, which means nothing to
``torch.optim.SGD``.

**Not supported** (``ValueError``): ``fused=True`` (a local kernel), ``differentiable=True`` (no
autograd through a server), sparse gradients, complex or half-precision parameters. ``foreach``
is accepted and kept in the groups, as torch's; it changes nothing (the server computes).

**Checkpoints and torch.** :func:`to_torch` turns a checkpoint file (``client.save_checkpoint``)
into ``(parameters by name, torch.optim.SGD state_dict)``; :func:`from_torch` turns a torch model
(or its parameters by name) and a ``torch.optim.SGD`` (or its ``state_dict``) into a checkpoint
file for ``client.load_checkpoint``. Training on from either side gives the same bits.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt
import torch
from torch.optim import Optimizer

from ._client import Client, check_server_arguments
from ._exceptions import NotFound
from ._models import RULES, ModelInfo
from ._safetensors import decode as _decode_safetensors
from ._safetensors import encode as _encode_safetensors
from ._steps import StepOptions

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

__all__ = ["RemoteSGD", "from_torch", "to_torch"]

_FORMAT = "momentum-checkpoint/1"  # the server's checkpoint codec (api/codecs/checkpoint.py)

# The server's parameter names (service/momentum_service/api/schemas.py PARAM_NAME_PATTERN).
_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,255}")

# The hyperparameters of a torch.optim.SGD group, which the server's pytorch rule has.
_SGD_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

# Each rule's hyperparameters (the server's kernels/rules.py); the others must stay neutral.
_RULE_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "pytorch": _SGD_HYPERPARAMETERS,
    "keras": ("lr", "momentum", "nesterov", "weight_decay"),
    "tf1": ("lr", "momentum", "nesterov"),
    "ema": ("lr", "momentum"),
    "previous_delta": ("lr", "momentum"),
}
_NEUTRAL: dict[str, Any] = {"dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}
_BOOLEAN = ("nesterov", "maximize")
# What torch.optim.SGD keeps in a group besides the hyperparameters (its defaults).
_SGD_GROUP_EXTRAS: dict[str, Any] = {"foreach": None, "differentiable": False, "fused": None}
_MODES = ("async", "sync", "bounded")
_FLOATS = (torch.float32, torch.float64)


def _scalar(key: str, value: Any) -> Any:
    """A group's hyperparameter as the JSON value to send (a 1-element tensor as its Python number)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if key in _BOOLEAN:
        return bool(value)
    return float(value)


def _numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    """A tensor's value as a numpy array (on the CPU; shares memory with a CPU tensor)."""
    array: npt.NDArray[Any] = tensor.detach().cpu().numpy()
    return array


def _tensor(array: npt.NDArray[Any]) -> torch.Tensor:
    """A numpy array as a tensor that owns its memory (the array may be a read-only view of a response)."""
    return torch.from_numpy(np.array(array, copy=True))


class RemoteSGD(Optimizer):
    """``torch.optim.SGD`` whose updates the server applies; see the module docstring.

    ``params``, ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ``maximize``,
    ``foreach``, ``differentiable`` and ``fused`` are ``torch.optim.SGD``'s, validated the same way
    (same messages). Then:

    ``model``: the model's name on the server. ``client``: a :class:`momentum_client.Client` to use
    (it stays open), or ``url`` (and ``api_key``, by default the ``MOMENTUM_API_KEY`` environment
    variable) to create one (closed by :meth:`close`). ``create``: create the model if it does not
    exist; with ``False`` it must exist. ``rule``: the server's momentum rule (``"pytorch"``:
    ``torch.optim.SGD``'s). ``mode``: ``"async"``, ``"sync"`` (with ``workers``, and this worker's
    ``rank`` in ``0..workers-1``) or ``"bounded"`` (with ``max_staleness``).

    Construction connects to the server (see the module docstring); arguments are checked first,
    so a bad argument raises before any request.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        model: str,
        client: Client | None = None,
        url: str | None = None,
        api_key: str | None = None,
        create: bool = True,
        rule: str = "pytorch",
        mode: str = "async",
        workers: int | None = None,
        rank: int | None = None,
        max_staleness: int | None = None,
    ) -> None:
        # torch.optim.SGD's checks, messages and order (torch/optim/sgd.py).
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        # RemoteSGD's own.
        if fused:
            raise ValueError(
                "RemoteSGD does not support fused=True: the server computes the update, not a local kernel"
            )
        if differentiable:
            raise ValueError("RemoteSGD does not support differentiable=True: autograd cannot run through a server")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the model's name on the server, got {model!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if mode == "sync":
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ValueError(f"mode='sync' needs workers, the number of workers (an int >= 1), got {workers!r}")
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < workers:
                raise ValueError(f"mode='sync' needs rank, this worker's id from 0 to {workers - 1}, got {rank!r}")
        elif workers is not None or rank is not None:
            raise ValueError(f"workers and rank go with mode='sync', not {mode!r}")
        if mode == "bounded":
            if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
                raise ValueError(f"mode='bounded' needs max_staleness (an int >= 0), got {max_staleness!r}")
        elif max_staleness is not None:
            raise ValueError(f"max_staleness goes with mode='bounded', not {mode!r}")
        check_server_arguments(client, url, api_key)
        self.model = model
        self.url = client.base_url if client is not None else url
        self.create = create
        self.rule = rule
        self.mode = mode
        self.workers = workers
        self.rank = rank
        self.max_staleness = max_staleness
        self._api_key = api_key
        self._client = client
        self._owns_client = False
        self._names: list[str] = []  # in state_dict() order
        self._name_of: dict[int, str] = {}  # id(param) -> name
        self._param_of: dict[str, torch.Tensor] = {}
        self._steps: dict[str, int] = {}  # each parameter's step on the server, as last seen
        self._versions: dict[str, int | None] = {}  # each parameter's version counter when last written here
        self._server_groups: dict[str, dict[str, Any]] = {}  # our groups as the server has them
        self._connected = False
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._group_hyperparameters(i, group)  # checks them before the first request
        self._connect(self._names)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.SGD does, for state dicts of older versions
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    # --- torch's optimizer interface ----------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does; after construction, the server's groups and parameters follow at once."""
        super().add_param_group(param_group)
        if not hasattr(self, "_names"):  # torch.optim.Optimizer.__init__ calls this before ours ran
            return
        group = self.param_groups[-1]
        try:
            if self._connected:
                self._group_hyperparameters(len(self.param_groups) - 1, group)
            added = self._name_group(group)  # last: it registers the names
        except Exception:
            self.param_groups.pop()
            raise
        if self._connected:
            self._connect(added)

    @overload
    def step(self, closure: None = None, *, metrics: Mapping[str, Any] | None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], *, metrics: Mapping[str, Any] | None = None) -> float: ...

    def step(
        self, closure: Callable[[], float] | None = None, *, metrics: Mapping[str, Any] | None = None
    ) -> float | None:
        """One step: the closure (if given), then every gradient in one request; the new values are copied
        into the parameters in place. Returns the closure's loss (``None`` without one).

        ``metrics`` (``{"loss": loss.item()}``; numbers or 0-d tensors) go with the push into the model's
        training series: the dashboard's curves."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[str, Any] = {}
        targets: list[tuple[str, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._name(p)
                grads[name] = _gradient(name, p)
                targets.append((name, p))
        if not grads:
            return loss
        self._check_versions()
        client = self.client
        self._send_hyperparameters()
        options: StepOptions = {}
        if self.mode != "async":
            bases = {self._steps[n] for n in grads}
            if len(bases) != 1:
                raise ValueError(
                    f"mode={self.mode!r} sends one base_step for all the gradients, but these parameters are at "
                    f"steps {sorted(bases)}: every step must send the same parameters (give every parameter a "
                    "gradient, as DDP requires)"
                )
            options["base_step"] = bases.pop()
            if self.mode == "sync":
                options["worker_id"] = self.rank
        if metrics is not None:
            options["metrics"] = {k: float(v) for k, v in metrics.items()}
        results = client.step_results(self.model, grads, **options)
        with torch.no_grad():
            for name, p in targets:
                result = results[name]
                assert result.value is not None  # return_params=True
                p.copy_(torch.from_numpy(_writable(result.value)))
                self._steps[name] = result.current_step if result.current_step is not None else result.step
                self._versions[name] = _version(p)
        self._saw_lrs({name: results[name].lr for name, _ in targets})
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD``'s state dict, the momentum buffers fetched from the server (one request)."""
        arrays, metadata = self._checkpoint()
        steps = metadata["params"]
        for name in self._names:
            p = self._param_of[name]
            velocity = arrays.get(f"{name}@velocity")
            if velocity is None:
                self.state.pop(p, None)
            else:
                self.state[p] = {"momentum_buffer": _tensor(velocity).to(p.device)}
            if name in steps:
                self._steps[name] = int(steps[name]["step"])
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``torch.optim.SGD``'s state dict (hyperparameters and momentum buffers) as torch does, then
        send the buffers with the parameters' current values to the server, in one checkpoint."""
        super().load_state_dict(state_dict)
        for i, group in enumerate(self.param_groups):
            self._group_hyperparameters(i, group)
        client = self.client
        arrays, metadata = self._checkpoint()
        listed: dict[str, Any] = metadata["params"]
        tensors: dict[str, npt.NDArray[Any]] = {}
        params: dict[str, Any] = {}
        for name, info in listed.items():  # the model's other parameters, as they are
            if name not in self._param_of:
                tensors[name] = arrays[name]
                tensors.update({f"{name}@{b}": arrays[f"{name}@{b}"] for b in info["state"]})
                params[name] = info
        for name in self._names:
            p = self._param_of[name]
            tensors[name] = _numpy(p)
            buffer = self.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                if tuple(buffer.shape) != tuple(p.shape):
                    raise ValueError(
                        f"the momentum buffer for parameter {name!r} has shape {list(buffer.shape)}, the parameter "
                        f"{list(p.shape)}: the state dict is another optimizer's"
                    )
                tensors[f"{name}@velocity"] = _numpy(buffer.to(p.dtype))
            params[name] = {
                "step": int(listed.get(name, {}).get("step", 0)),
                "state": [] if buffer is None else ["velocity"],
            }
        config = dict(metadata["config"])
        config["groups"] = self._desired_groups()
        info = client.load_checkpoint(self.model, _write_checkpoint(tensors, config, params, self.model))
        self._track(info)
        for name in self._names:
            self._steps[name] = info.params[name].step
            self._versions[name] = _version(self._param_of[name])

    # --- the server ---------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The client: the one passed in, or one created for ``url`` on first use."""
        if self._client is None:
            assert self.url is not None  # __init__ requires client or url
            self._client = Client(self.url, api_key=self._api_key)
            self._owns_client = True
        return self._client

    @property
    def param_names(self) -> list[str]:
        """The parameters' names on the server, in ``state_dict()`` order."""
        return list(self._names)

    def close(self) -> None:
        """Close the client if this optimizer created it (a client passed in stays open)."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None
            self._owns_client = False

    def _checkpoint(self) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
        """The model's checkpoint, read: its tensors and metadata (one request)."""
        content = self.client.save_checkpoint(self.model)
        assert content is not None  # returned when no file is given
        return _read_checkpoint(content)

    def _name(self, p: torch.Tensor) -> str:
        name = self._name_of.get(id(p))
        if name is None:
            raise RuntimeError(
                "a parameter in a group is not known to RemoteSGD: add parameters with add_param_group(), "
                "not by changing a group's 'params'"
            )
        return name

    def _name_group(self, group: dict[str, Any]) -> list[str]:
        """Name a new group's parameters (checked, not yet sent); returns the names."""
        given = group.get("param_names")
        added: list[str] = []
        seen: set[int] = set()
        for j, p in enumerate(group["params"]):
            name = str(given[j]) if given is not None else str(len(self._names) + len(added))
            if not _PARAM_NAME.fullmatch(name):
                raise ValueError(
                    f"parameter {name!r} cannot be a parameter name on the server (letters, digits and _ . : - "
                    "only, up to 256 characters, not starting with . : -)"
                )
            if name in self._param_of or name in added:
                raise ValueError(f"two parameters are named {name!r}: give the optimizer distinct names")
            if id(p) in self._name_of or id(p) in seen:
                raise ValueError(f"parameter {name!r} is given to the optimizer twice")
            seen.add(id(p))
            if p.dtype not in _FLOATS:
                raise ValueError(f"parameter {name!r} is {p.dtype}; the server keeps float32 and float64 parameters")
            if p.layout != torch.strided:
                raise ValueError(f"parameter {name!r} is {p.layout}; RemoteSGD trains dense parameters")
            added.append(name)
        group_params = list(group["params"])
        for name, p in zip(added, group_params, strict=True):
            self._names.append(name)
            self._name_of[id(p)] = name
            self._param_of[name] = p
        return added

    def _group_hyperparameters(self, index: int, group: Mapping[str, Any]) -> dict[str, Any]:
        """A group's hyperparameters as the server's rule takes them; ``ValueError`` for any it lacks."""
        keys = _RULE_HYPERPARAMETERS[self.rule]
        for key in _SGD_HYPERPARAMETERS:
            if key not in keys and _scalar(key, group[key]) != _NEUTRAL[key]:
                raise ValueError(
                    f"parameter group {index} has {key}={group[key]!r}, but rule {self.rule!r} has no {key} "
                    f"(its hyperparameters: {', '.join(keys)})"
                )
        return {key: _scalar(key, group[key]) for key in keys}

    def _desired_groups(self) -> list[dict[str, Any]]:
        """The server's groups for this optimizer: one per non-empty torch group, named by its index."""
        out = []
        for i, group in enumerate(self.param_groups):
            names = [self._name(p) for p in group["params"]]
            if names:
                out.append({"name": str(i), "params": names, **self._group_hyperparameters(i, group)})
        return out

    def _track(self, info: ModelInfo) -> None:
        """Remember the server's groups (each hyperparameter resolved: the group's, else the model's)."""
        keys = _RULE_HYPERPARAMETERS[self.rule]
        self._server_groups = {
            str(g["name"]): {
                "params": list(g["params"]),
                **{k: g[k] if k in g else getattr(info.optimizer, k) for k in keys},
            }
            for g in info.groups
        }

    def _check_model(self, info: ModelInfo) -> None:
        if info.optimizer.rule != self.rule:
            raise ValueError(
                f"model {self.model!r} uses the rule {info.optimizer.rule!r}; this optimizer asks for {self.rule!r}"
            )
        if (info.mode, info.workers, info.max_staleness) != (self.mode, self.workers, self.max_staleness):
            raise ValueError(
                f"model {self.model!r} has {_describe_mode(info.mode, info.workers, info.max_staleness)}; this "
                f"optimizer asks for {_describe_mode(self.mode, self.workers, self.max_staleness)}"
            )
        if info.schedule.get("type") != "constant":
            raise ValueError(
                f"model {self.model!r} has the server-side lr schedule {dict(info.schedule)}; RemoteSGD sets the lr "
                "itself (use a torch.optim.lr_scheduler instead)"
            )
        for name in self._names:
            param = info.params.get(name)
            p = self._param_of[name]
            dtype = str(p.dtype).removeprefix("torch.")
            if param is not None and (tuple(param.shape), param.dtype) != (tuple(p.shape), dtype):
                raise ValueError(
                    f"parameter {name!r} of model {self.model!r} is {param.dtype}{list(param.shape)} on the server, "
                    f"here {dtype}{list(p.shape)}"
                )

    def _connect(self, names: Sequence[str]) -> None:
        """Join the model (creating it if asked), set its groups to ours, upload the parameters ``names`` it
        lacks, and copy the server's values of the others into them."""
        client = self.client
        desired = self._desired_groups()
        info: ModelInfo | None = None
        if self._connected:
            info = client.get_model(self.model)
        else:
            try:
                info = client.get_model(self.model)
            except NotFound:
                if not self.create:
                    raise
            if info is None:
                # exist_ok: another worker may create it at the same time.
                defaults = self._group_hyperparameters(-1, self.defaults)
                info = client.create_model(
                    self.model,
                    rule=self.rule,
                    mode=self.mode,
                    workers=self.workers,
                    max_staleness=self.max_staleness,
                    groups=desired,
                    exist_ok=True,
                    **defaults,
                )
        self._check_model(info)
        self._track(info)
        if self._server_groups != {g["name"]: {k: v for k, v in g.items() if k != "name"} for g in desired}:
            info = client.update_model(self.model, groups=desired)
            self._track(info)
        missing = {n: _numpy(self._param_of[n]) for n in names if n not in info.params}
        created = client.init_params(self.model, missing, exist_ok=True) if missing else {}
        adopt = [n for n in names if not created.get(n, False)]
        if adopt:
            values = client.get_params(self.model, adopt)
            with torch.no_grad():
                for name in adopt:
                    self._param_of[name].copy_(torch.from_numpy(_writable(values[name])))
        if self.mode != "async" and adopt:
            info = client.get_model(self.model)  # the steps the sync and bounded pushes start from
        for name in names:
            self._steps[name] = info.params[name].step if name in info.params else 0
            self._versions[name] = _version(self._param_of[name])
        self._connected = True

    def _send_hyperparameters(self) -> None:
        """Send the hyperparameters that differ from the server's, in one request (none if none differ)."""
        desired = self._desired_groups()
        server = self._server_groups
        if [(g["name"], g["params"]) for g in desired] != [(n, s["params"]) for n, s in server.items()]:
            self._track(self.client.update_model(self.model, groups=desired))  # the groups themselves changed
            return
        changes = {}
        for group in desired:
            have = server[group["name"]]
            diff = {k: v for k, v in group.items() if k not in ("name", "params") and have[k] != v}
            if diff:
                changes[group["name"]] = diff
        if changes:
            self._track(self.client.update_model(self.model, groups=changes))

    def _saw_lrs(self, lrs: Mapping[str, float]) -> None:
        """A step's lr per parameter: where it is not the lr we thought the server had (another worker set
        its own), remember it, so that the next step sends ours again."""
        for group in self._server_groups.values():
            lr = next((lrs[p] for p in group["params"] if p in lrs), None)
            if lr is not None and lr != group["lr"]:
                group["lr"] = lr

    def _check_versions(self) -> None:
        for name in self._names:
            p = self._param_of[name]
            if _version(p) != self._versions.get(name):
                raise RuntimeError(
                    f"parameter {name!r} was changed in place since RemoteSGD last wrote it (a model.load_state_dict() "
                    "or an in-place init after the optimizer was built?). Its value lives on the server, and this step "
                    "would overwrite the change. To send the local values, keeping the momentum buffers: "
                    "optimizer.load_state_dict(optimizer.state_dict())"
                )


def _describe_mode(mode: str, workers: int | None, max_staleness: int | None) -> str:
    out = f"mode={mode!r}"
    if workers is not None:
        out += f", workers={workers}"
    if max_staleness is not None:
        out += f", max_staleness={max_staleness}"
    return out


def _version(p: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change), ``None`` where there is none."""
    try:
        version = getattr(p, "_version", None)
    except RuntimeError:  # inference tensors have no version counter
        return None
    return version if isinstance(version, int) else None


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # torch.from_numpy warns about (and would share) a read-only array.
    return array if array.flags.writeable else array.copy()


def _gradient(name: str, p: torch.Tensor) -> Any:
    """A parameter's gradient as it is sent: a numpy array of the parameter's dtype, or a float32 parameter's
    float16/bfloat16 gradient as the tensor itself (the client sends it as is)."""
    g = p.grad
    assert g is not None
    if g.layout != torch.strided:
        raise ValueError(f"the gradient of parameter {name!r} is {g.layout}; RemoteSGD sends dense gradients")
    if g.dtype == p.dtype:
        return _numpy(g)
    if p.dtype == torch.float32 and g.dtype in (torch.float16, torch.bfloat16):
        return g.detach()
    if p.dtype == torch.float64 and g.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return _numpy(g.to(torch.float64))  # exact
    raise TypeError(
        f"the gradient of parameter {name!r} is {g.dtype}, the parameter {p.dtype}: RemoteSGD sends a gradient "
        "in its parameter's dtype (or a narrower float, widened exactly); cast it"
    )


# --- checkpoint files <-> torch --------------------------------------------------------------


Checkpoint = bytes | bytearray | memoryview | str | os.PathLike[str]
"""A checkpoint file: its bytes (``client.save_checkpoint(model)``), or a path."""


def _read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    if isinstance(checkpoint, str | os.PathLike):
        with open(checkpoint, "rb") as f:
            checkpoint = f.read()
    arrays, metadata = _decode_safetensors(memoryview(checkpoint))
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"not a momentum-service checkpoint: its format is {metadata.get('format')!r}, not {_FORMAT!r}"
        )
    if not isinstance(metadata.get("config"), dict) or not isinstance(metadata.get("params"), dict):
        raise ValueError("the checkpoint's metadata lacks its config or its params")
    return arrays, metadata


def _write_checkpoint(
    tensors: Mapping[str, npt.NDArray[Any]], config: Mapping[str, Any], params: Mapping[str, Any], model: str
) -> bytes:
    metadata = {"format": _FORMAT, "model": model, "config": config, "params": params}
    return b"".join(bytes(part) for part in _encode_safetensors(tensors, metadata))


def _ordered(names: Iterable[str]) -> list[str]:
    """Names in their natural order: numerically when they are all positions ("0", "1", ... "10")."""
    names = list(names)
    if all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def to_torch(
    checkpoint: Checkpoint, param_names: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint (``client.save_checkpoint(model)``) as torch's pair: ``(parameters, optimizer_state_dict)``.

    ``parameters`` maps each parameter's name to its value (a CPU tensor): load it with
    ``net.load_state_dict(parameters, strict=False)`` (buffers such as BatchNorm's running statistics
    are not in a checkpoint; ``strict=False`` keeps the model's own). ``optimizer_state_dict`` is
    ``torch.optim.SGD``'s: the momentum buffers and one parameter group per group of the model's
    config, in its order (each with the hyperparameters it resolves to), then one for the parameters in
    no group (the model's hyperparameters), if any. Build the ``torch.optim.SGD`` with the same groups
    in the same order, then ``optimizer.load_state_dict(optimizer_state_dict)``.

    Within a group the parameters are in the order the group lists them (patterns: their matches by
    name); the parameters in no group by name (positions ``"0"``, ``"1"``, ... numerically). A model
    made by :class:`RemoteSGD` lists each torch group's parameters in its order, so this is its order.
    ``param_names`` (every parameter's name, e.g. ``[n for n, _ in net.named_parameters()]``) orders
    each group's parameters as listed there instead.

    Only the ``pytorch`` rule's momentum buffers are ``torch.optim.SGD``'s (``ValueError`` for
    another rule). A server-side lr schedule has no place in the pair: the groups get the model's base
    lr, with a warning (attach the matching ``torch.optim.lr_scheduler``).
    """
    arrays, metadata = _read_checkpoint(checkpoint)
    config: dict[str, Any] = metadata["config"]
    listed: dict[str, Any] = metadata["params"]
    optimizer = {k: v for k, v in config["optimizer"].items() if k != "rule"}
    rule = config["optimizer"].get("rule", "pytorch")
    if rule != "pytorch":
        raise ValueError(f"the checkpoint's rule is {rule!r}: only the pytorch rule's state is torch.optim.SGD's")
    schedule = config.get("schedule") or {"type": "constant"}
    if schedule.get("type") != "constant":
        warnings.warn(
            f"the checkpoint's model has the lr schedule {schedule}, which a torch.optim.SGD state dict cannot "
            "carry: its groups have the base lr; attach the matching torch.optim.lr_scheduler",
            stacklevel=2,
        )
    names = list(listed)
    if param_names is not None:
        given = list(param_names)
        if sorted(given) != sorted(names):
            missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
            raise ValueError(
                f"param_names must name every parameter of the checkpoint once: missing {missing[:5]}, "
                f"not in the checkpoint {extra[:5]}"
            )
        rank = {n: i for i, n in enumerate(given)}
    groups: list[tuple[dict[str, Any], list[str]]] = []
    assigned: set[str] = set()
    for group in config.get("groups") or []:
        members: list[str] = []
        for entry in group["params"]:
            matches = [entry] if entry in listed else _ordered(n for n in names if fnmatchcase(n, entry))
            members += [n for n in matches if n not in assigned and n not in members]
        assigned.update(members)
        hyper = {**optimizer, **{k: v for k, v in group.items() if k not in ("name", "params")}}
        groups.append((hyper, members))
    groups.append((optimizer, _ordered(n for n in names if n not in assigned)))
    if param_names is not None:
        groups = [(hyper, sorted(members, key=rank.__getitem__)) for hyper, members in groups]
    parameters: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    for hyper, members in groups:
        if not members:
            continue
        ids = []
        for name in members:
            index = len(parameters)
            parameters[name] = _tensor(arrays[name])
            if "velocity" in listed[name].get("state", []):
                state[index] = {"momentum_buffer": _tensor(arrays[f"{name}@velocity"])}
            ids.append(index)
        group_dict = {key: hyper.get(key, _NEUTRAL.get(key)) for key in _SGD_HYPERPARAMETERS}
        param_groups.append({**group_dict, **_SGD_GROUP_EXTRAS, "params": ids})
    return parameters, {"state": state, "param_groups": param_groups}


def from_torch(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: Optimizer | Mapping[str, Any],
    *,
    param_names: Sequence[str] | None = None,
    steps: int | Mapping[str, int] = 0,
    mode: str = "async",
    workers: int | None = None,
    max_staleness: int | None = None,
) -> bytes:
    """A checkpoint file (for ``client.load_checkpoint(model, ...)``) from a torch model and its
    ``torch.optim.SGD`` (or that optimizer's ``state_dict()``).

    ``model``: a ``torch.nn.Module`` (its ``named_parameters()``) or a mapping of names to tensors
    (float32 or float64): the values. ``optimizer``: the momentum buffers and the hyperparameters. An
    optimizer object is matched to the names by identity. A state dict holds positions only: they are
    matched to ``param_names`` (every name, in the optimizer's order: the groups' parameters, group
    after group), else to the groups' own ``param_names`` (an optimizer built from
    ``named_parameters()`` keeps them), else to the model's order of parameters, which is the
    optimizer's when it was built from ``net.parameters()`` in one group; a buffer whose shape is not
    its parameter's raises ``ValueError``.

    The model's config gets the first group's hyperparameters as the model's, and one group per torch
    group (``"0"``, ``"1"``, ... as :class:`RemoteSGD` makes them), rule ``pytorch``, a constant
    schedule, and ``mode``/``workers``/``max_staleness``. ``steps``: each parameter's step count
    (one number for all, or by name; torch's SGD keeps none; missing names are at 0).
    """
    values: dict[str, torch.Tensor] = (
        dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
    )
    if isinstance(optimizer, Optimizer):
        by_id = {id(t): n for n, t in values.items()}
        order = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError(
                        f"the optimizer holds a parameter of shape {list(p.shape)} that is not the model's"
                    )
                order.append(by_id[id(p)])
        state_dict = optimizer.state_dict()
    else:
        state_dict = dict(optimizer)
        saved_names = [g.get("param_names") for g in state_dict["param_groups"]]
        if param_names is not None:
            order = [str(n) for n in param_names]
        elif all(n is not None for n in saved_names):
            order = [str(n) for names in saved_names for n in names]
        else:
            order = list(values)
    groups: list[dict[str, Any]] = state_dict["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(order):
        raise ValueError(
            f"the optimizer has {len(ids)} parameters, {len(order)} names were found: pass param_names, the names "
            "of the optimizer's parameters in its order"
        )
    unknown = [n for n in order if n not in values]
    if unknown:
        raise ValueError(f"the optimizer's parameters {unknown[:5]} are not the model's")
    for group in groups:
        if "momentum" not in group or "lr" not in group:
            raise ValueError("not a torch.optim.SGD state dict: a parameter group has no lr or momentum")
    name_of = dict(zip(ids, order, strict=True))
    for key, entry in state_dict["state"].items():
        if set(entry) - {"momentum_buffer"}:
            raise ValueError(
                f"not a torch.optim.SGD state dict: the state of parameter {key} holds {sorted(entry)}, "
                "not a momentum_buffer"
            )
    tensors: dict[str, npt.NDArray[Any]] = {}
    params: dict[str, Any] = {}
    for i, name in name_of.items():
        value = values[name]
        if value.dtype not in _FLOATS:
            raise ValueError(f"parameter {name!r} is {value.dtype}; the server keeps float32 and float64 parameters")
        tensors[name] = _numpy(value)
        buffer = state_dict["state"].get(i, {}).get("momentum_buffer")
        if buffer is not None:
            if tuple(buffer.shape) != tuple(value.shape):
                raise ValueError(
                    f"the momentum buffer matched to parameter {name!r} has shape {list(buffer.shape)}, the "
                    f"parameter {list(value.shape)}: pass param_names in the optimizer's order"
                )
            tensors[f"{name}@velocity"] = _numpy(buffer.to(value.dtype))
        step = steps if isinstance(steps, int) else steps.get(name, 0)
        params[name] = {"step": int(step), "state": [] if buffer is None else ["velocity"]}

    def hyper(group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _scalar(k, group.get(k, _NEUTRAL.get(k))) for k in _SGD_HYPERPARAMETERS}

    config: dict[str, Any] = {
        "optimizer": {"rule": "pytorch", **hyper(groups[0])},
        "schedule": {"type": "constant"},
        "mode": mode,
        "groups": [
            {"name": str(i), "params": [name_of[j] for j in g["params"]], **hyper(g)}
            for i, g in enumerate(groups)
            if g["params"]
        ],
    }
    if workers is not None:
        config["workers"] = workers
    if max_staleness is not None:
        config["max_staleness"] = max_staleness
    return _write_checkpoint(tensors, config, params, "from_torch")
