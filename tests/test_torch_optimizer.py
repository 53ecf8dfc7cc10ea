"""``momentum_client.torch``: RemoteSGD and the checkpoint <-> torch conversion, against a real server process.

The reference is ``torch.optim.SGD`` itself, on a twin of the network (same initial values, same
batches): a small CNN with BatchNorm trained by ``RemoteSGD`` must end with its parameters, its
momentum buffers (``state_dict``) and its BatchNorm running statistics (local, computed from the
values the server returns) bitwise those of the twin, with nesterov, weight decay, two parameter
groups and an lr scheduler, in float32 and float64. Sync workers are compared with torch applying
the mean gradient as the server computes it. A negative control shows a lost lr change is seen.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_service.engine.sync import mean_gradient
from momentum_service.kernels.rules import TF1Momentum

from .helpers import ServerProcess

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from momentum_client.torch import RemoteSGD, from_torch, to_torch  # noqa: E402

STEPS = 30
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-3
NOWHERE = "http://127.0.0.1:1"  # nothing listens: an argument error must come before any request


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny convolutions on a shared 2-core machine: torch's second thread only contends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[mc.Client]:
    with mc.Client(server.url) as c:
        yield c


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: Any) -> Any:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _net(dtype: Any = None) -> Any:
    """The same initial values every time."""
    torch.manual_seed(0)
    net = Net()
    return net.to(dtype) if dtype is not None else net


_X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
_Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))


def _batch(k: int, dtype: Any, shard: int = 0, shards: int = 1) -> tuple[Any, Any]:
    """Step k's batch of 8 (of shard ``shard``: each worker its own rows)."""
    start = ((k * shards + shard) % 8) * 8
    return _X[start : start + 8].to(dtype), _Y[start : start + 8]


def _groups(net: Any, named: bool = False) -> list[dict[str, Any]]:
    """Weights decay; biases and BatchNorm's affine parameters neither decay nor share the lr."""
    decay = [(n, p) for n, p in net.named_parameters() if n in ("conv.weight", "fc.weight")]
    rest = [(n, p) for n, p in net.named_parameters() if n not in ("conv.weight", "fc.weight")]
    if not named:
        decay, rest = [p for _, p in decay], [p for _, p in rest]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0, "lr": 0.1}]


HYPER = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "nesterov": True}


def _train(net: Any, opt: Any, steps: range, dtype: Any, scheduler: Any = None) -> list[tuple[float, float]]:
    """Train; returns each group's (lr, momentum) at the last step."""
    used = []
    for k in steps:
        x, y = _batch(k, dtype)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        used = [(g["lr"], g["momentum"]) for g in opt.param_groups]
        if scheduler is not None:
            scheduler.step()
    return used


def _bits(t: Any) -> bytes:
    return bytes(t.detach().cpu().contiguous().numpy().tobytes())


def _assert_same_net(a: Any, b: Any) -> None:
    """Parameters and buffers (BatchNorm's running statistics), bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or _bits(sa[k]) != _bits(sb[k])]
    assert not different, different


def _assert_same_state_dict(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for i in a["state"]:
        assert set(a["state"][i]) == set(b["state"][i]) == {"momentum_buffer"}
        x, y = a["state"][i]["momentum_buffer"], b["state"][i]["momentum_buffer"]
        assert x.dtype == y.dtype and _bits(x) == _bits(y), i


SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.2], total_steps=STEPS),
}


def _count_updates(client: mc.Client, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every update_model the optimizer sends (the groups it changes)."""
    calls: list[dict[str, Any]] = []
    real = client.update_model

    def update_model(model: str, **kwargs: Any) -> mc.ModelInfo:
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(client, "update_model", update_model)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_a_cnn_trains_bitwise_as_torch_sgd(
    client: mc.Client, monkeypatch: pytest.MonkeyPatch, dtype: Any, schedule: str
) -> None:
    named = schedule == "steplr"  # one scheduler with named_parameters-style groups, one with positions
    remote_net, torch_net = _net(dtype), _net(dtype)
    remote = RemoteSGD(_groups(remote_net, named), **HYPER, model=_name("cnn"), client=client)
    reference = torch.optim.SGD(_groups(torch_net, named), **HYPER)
    updates = _count_updates(client, monkeypatch)
    remote_sched, torch_sched = SCHEDULERS[schedule](remote), SCHEDULERS[schedule](reference)
    last = _train(remote_net, remote, range(STEPS), dtype, remote_sched)
    _train(torch_net, reference, range(STEPS), dtype, torch_sched)

    _assert_same_net(remote_net, torch_net)  # values, and BatchNorm's running stats computed from them
    _assert_same_state_dict(remote.state_dict(), reference.state_dict())  # momentum buffers, groups
    start = _net(dtype).parameters()
    moved = [float((a - b).detach().abs().max()) for a, b in zip(remote_net.parameters(), start, strict=True)]
    assert max(moved) > 0.01
    if schedule == "steplr":
        # lr changes at steps 10 and 20 only: one request each, both groups in it.
        assert [set(u["groups"]) for u in updates] == [{"0", "1"}, {"0", "1"}]
        assert remote.param_names == ["conv.weight", "fc.weight", "conv.bias", "bn.weight", "bn.bias", "fc.bias"]
    else:
        # OneCycleLR changes lr and momentum before every step (its first values in its constructor).
        assert len(updates) == STEPS and all(set(u["groups"]["0"]) == {"lr", "momentum"} for u in updates)
        assert remote.param_names == [str(i) for i in range(6)]
    # The server's groups hold exactly the last step's hyperparameters (the scheduler's step after it is
    # sent with the next optimizer step).
    groups = client.get_model(remote.model).groups
    assert [(g["lr"], g["momentum"]) for g in groups] == last


def test_negative_control_an_lr_change_that_does_not_reach_the_server(
    client: mc.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the scheduler's update_model (made a no-op), the values differ: the test above can fail."""
    remote_net, torch_net = _net(), _net()
    remote = RemoteSGD(_groups(remote_net), **HYPER, model=_name("control"), client=client)
    reference = torch.optim.SGD(_groups(torch_net), **HYPER)
    monkeypatch.setattr(client, "update_model", lambda model, **kwargs: client.get_model(model))
    _train(remote_net, remote, range(12), torch.float32, SCHEDULERS["steplr"](remote))
    _train(torch_net, reference, range(12), torch.float32, SCHEDULERS["steplr"](reference))
    assert _bits(remote_net.fc.weight) != _bits(torch_net.fc.weight)


def test_sync_workers_are_torch_on_the_mean_gradient(server: ServerProcess) -> None:
    """Two threads, each its own network, RemoteSGD, client and shard of the data: DDP's result."""
    name, steps, dtype = _name("sync"), 8, torch.float32
    nets = [_net(), _net()]
    nets[1].fc.weight.data.mul_(2.0)  # the second worker adopts the server's values, the first worker's
    # Rank 0 first, so that its values are the model's (as DDP broadcasts rank 0's): then both step at once.
    opts = [
        RemoteSGD(_groups(net), **HYPER, model=name, url=server.url, mode="sync", workers=2, rank=rank)
        for rank, net in enumerate(nets)
    ]
    _assert_same_net(nets[1], _net())
    losses: list[list[float]] = [[], []]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        net, opt = nets[rank], opts[rank]
        try:
            for k in range(steps):
                x, y = _batch(k, dtype, rank, 2)

                def closure(x: Any = x, y: Any = y) -> Any:
                    opt.zero_grad()
                    loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    return loss

                losses[rank].append(opt.step(closure).item())
        except BaseException as exc:
            errors.append(exc)
        finally:
            opt.close()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # torch on the mean gradient: each replica's gradient on its shard, averaged as the server does.
    replicas = [_net(), _net()]
    reference = torch.optim.SGD(_groups(replicas[0]), **HYPER)
    want_losses: list[list[float]] = [[], []]
    for k in range(steps):
        grads = []
        for rank, replica in enumerate(replicas):
            replica.zero_grad()
            x, y = _batch(k, dtype, rank, 2)
            loss = F.cross_entropy(replica(x), y)
            loss.backward()
            want_losses[rank].append(loss.item())
            grads.append([p.grad.numpy().copy() for p in replica.parameters()])
        for i, p in enumerate(replicas[0].parameters()):
            p.grad = torch.from_numpy(mean_gradient({0: grads[0][i], 1: grads[1][i]}))
        reference.step()
        with torch.no_grad():
            for p0, p1 in zip(replicas[0].parameters(), replicas[1].parameters(), strict=True):
                p1.copy_(p0)
    assert losses == want_losses
    for net, replica in zip(nets, replicas, strict=True):
        _assert_same_net(net, replica)  # each worker's BatchNorm statistics are its shard's
    # Not the single-worker result: the mean differs from either gradient.
    alone = _net()
    _train(alone, torch.optim.SGD(_groups(alone), **HYPER), range(steps), dtype)
    assert _bits(alone.fc.weight) != _bits(nets[0].fc.weight)


def test_state_dicts_go_to_torch_and_back(client: mc.Client) -> None:
    dtype = torch.float32
    remote_net, torch_net = _net(), _net()
    remote = RemoteSGD(_groups(remote_net), **HYPER, model=_name("state"), client=client)
    reference = torch.optim.SGD(_groups(torch_net), **HYPER)
    _train(remote_net, remote, range(5), dtype)
    _train(torch_net, reference, range(5), dtype)
    saved = remote.state_dict()
    _assert_same_state_dict(saved, reference.state_dict())

    # RemoteSGD -> torch.optim.SGD (built with other hyperparameters: the state dict's replace them).
    loaded_net = copy.deepcopy(remote_net)
    loaded = torch.optim.SGD(_groups(loaded_net), lr=1.0)
    loaded.load_state_dict(saved)
    _train(loaded_net, loaded, range(5, 10), dtype)
    _train(remote_net, remote, range(5, 10), dtype)
    _assert_same_net(remote_net, loaded_net)

    # torch.optim.SGD -> RemoteSGD: torch trains on alone, then the remote model takes its state.
    _train(loaded_net, loaded, range(10, 13), dtype)
    remote_net.load_state_dict(loaded_net.state_dict())
    with pytest.raises(RuntimeError, match=r"changed in place .* optimizer.load_state_dict"):
        remote.step()  # the local values are not the server's (the last step's gradients are still there)
    remote.load_state_dict(loaded.state_dict())
    _train(remote_net, remote, range(13, 18), dtype)
    _train(loaded_net, loaded, range(13, 18), dtype)
    _assert_same_net(remote_net, loaded_net)
    _assert_same_state_dict(remote.state_dict(), loaded.state_dict())
    # The server kept counting the parameters' steps (5 + 5 + 5; the refused step sent nothing).
    assert {p.step for p in client.get_model(remote.model).params.values()} == {15}

    # A fresh model from a state dict: a parameter without a buffer starts one from its gradient.
    fresh_net = copy.deepcopy(loaded_net)
    fresh = RemoteSGD(_groups(fresh_net), **HYPER, model=_name("fresh"), client=client)
    state = loaded.state_dict()
    del state["state"][5]
    fresh.load_state_dict(state)
    loaded.load_state_dict(state)
    _train(fresh_net, fresh, range(18, 21), dtype)
    _train(loaded_net, loaded, range(18, 21), dtype)
    _assert_same_net(fresh_net, loaded_net)
    assert {p.step for p in client.get_model(fresh.model).params.values()} == {3}


def test_checkpoints_convert_to_torch_and_back(client: mc.Client) -> None:
    dtype = torch.float64
    net = _net(dtype)
    remote = RemoteSGD(_groups(net, named=True), **HYPER, model=_name("convert"), client=client)
    _train(net, remote, range(8), dtype)

    # The service's checkpoint -> torch's pair -> torch trains on; the service trains on too.
    parameters, optimizer_state = to_torch(client.save_checkpoint(remote.model))
    assert list(parameters) == remote.param_names  # each torch group's parameters, in its order
    torch_net = _net(dtype)
    torch_net.load_state_dict(parameters, strict=False)
    torch_net.bn.load_state_dict(net.bn.state_dict())  # running stats are local: not in a checkpoint
    reference = torch.optim.SGD(_groups(torch_net, named=True), lr=1.0)
    reference.load_state_dict(optimizer_state)
    _train(net, remote, range(8, 16), dtype)
    _train(torch_net, reference, range(8, 16), dtype)
    _assert_same_net(net, torch_net)

    # torch's pair -> a checkpoint -> a new model on the service, which trains as torch does.
    restored = _name("restored")
    client.load_checkpoint(restored, from_torch(torch_net, reference, steps=16))
    assert {p.step for p in client.get_model(restored).params.values()} == {16}
    restored_net = _net(dtype)  # RemoteSGD adopts the server's values
    restored_net.bn.load_state_dict(torch_net.bn.state_dict())
    again = RemoteSGD(_groups(restored_net, named=True), **HYPER, model=restored, client=client)
    _assert_same_net(restored_net, torch_net)
    _train(restored_net, again, range(16, 24), dtype)
    _train(torch_net, reference, range(16, 24), dtype)
    _assert_same_net(restored_net, torch_net)

    # A state dict alone is matched by position: to its groups' param_names, to param_names, else to the
    # model's order (here not the optimizer's: the buffers' shapes tell).
    by_identity = from_torch(torch_net, reference)
    assert from_torch(torch_net, reference.state_dict()) == by_identity
    positional = reference.state_dict()
    for group in positional["param_groups"]:
        del group["param_names"]
    assert from_torch(torch_net, positional, param_names=again.param_names) == by_identity
    with pytest.raises(ValueError, match=r"momentum buffer matched to parameter 'conv\.bias'"):
        from_torch(torch_net, positional)


def test_add_param_group_and_a_server_group_per_group(client: mc.Client) -> None:
    dtype = torch.float32
    remote_net, torch_net = _net(), _net()
    remote = RemoteSGD([remote_net.conv.weight, remote_net.conv.bias], **HYPER, model=_name("add"), client=client)
    reference = torch.optim.SGD([torch_net.conv.weight, torch_net.conv.bias], **HYPER)
    _train(remote_net, remote, range(3), dtype)
    _train(torch_net, reference, range(3), dtype)
    remote.add_param_group({"params": list(remote_net.bn.parameters()) + list(remote_net.fc.parameters()), "lr": 0.2})
    reference.add_param_group({"params": list(torch_net.bn.parameters()) + list(torch_net.fc.parameters()), "lr": 0.2})
    _train(remote_net, remote, range(3, 8), dtype)
    _train(torch_net, reference, range(3, 8), dtype)
    _assert_same_net(remote_net, torch_net)
    groups = client.get_model(remote.model).groups
    assert [(g["name"], g["params"], g["lr"]) for g in groups] == [
        ("0", ["0", "1"], LR),
        ("1", ["2", "3", "4", "5"], 0.2),
    ]


def test_bounded_mode_half_gradients_and_another_rule(client: mc.Client) -> None:
    """mode='bounded' sends base_step; a float32 parameter's bfloat16/float16 gradient travels as is (widened
    exactly by the server); a float64 one's float32 gradient is widened here; rule='tf1' is that rule."""
    w32 = torch.zeros(3, dtype=torch.float32, requires_grad=True)
    w64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    remote = RemoteSGD(
        [w32, w64], lr=0.1, momentum=0.9, model=_name("bounded"), client=client, mode="bounded", max_staleness=0
    )
    t32, t64 = w32.detach().clone().requires_grad_(), w64.detach().clone().requires_grad_()
    reference = torch.optim.SGD([t32, t64], lr=0.1, momentum=0.9)
    w64.grad_dtype = torch.float32  # torch 2.13: autograd then makes gradients of this dtype
    for k, half in enumerate([torch.bfloat16, torch.float16, torch.bfloat16]):
        g = torch.tensor([0.3, -1.7, 2.0 + k]).to(half)
        w32.grad = None
        w32.grad_dtype = half
        w32.grad, w64.grad = g, g.float()
        t32.grad, t64.grad = g.float(), g.double()
        remote.step()
        reference.step()
    assert (_bits(w32), _bits(w64)) == (_bits(t32), _bits(t64))
    assert {p.step for p in client.get_model(remote.model).params.values()} == {3}

    rule = TF1Momentum(lr=0.1, momentum=0.9)
    w = torch.zeros(4, requires_grad=True)
    tf1 = RemoteSGD([w], lr=0.1, momentum=0.9, rule="tf1", model=_name("tf1"), client=client)
    value, velocity = np.zeros(4, np.float32), None
    for k in range(3):
        grad = np.array([0.5, -1.0, 2.0, 0.1 * k], np.float32)
        w.grad = torch.from_numpy(grad.copy())
        tf1.step()
        value, velocity = rule.update(value, velocity, grad, 0.1)
    assert _bits(w) == value.tobytes()
    assert client.get_model(tf1.model).optimizer.rule == "tf1"
    with pytest.raises(ValueError, match="rule 'tf1' has no weight_decay"):
        RemoteSGD([w], lr=0.1, momentum=0.9, weight_decay=0.1, rule="tf1", model=_name("tf1"), client=client)


def _torch_error(**kwargs: Any) -> str:
    params = kwargs.pop("params", [torch.zeros(2, requires_grad=True)])
    with pytest.raises((ValueError, TypeError)) as info:
        torch.optim.SGD(params, **kwargs)
    return f"{type(info.value).__name__}: {info.value}"


def _our_error(**kwargs: Any) -> str:
    params = kwargs.pop("params", [torch.zeros(2, requires_grad=True)])
    with pytest.raises((ValueError, TypeError)) as info:
        RemoteSGD(params, **kwargs, model="m", url=NOWHERE)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.filterwarnings("ignore")
def test_bad_arguments_fail_as_torch_sgd_does() -> None:
    p = torch.zeros(2, requires_grad=True)
    cases: list[dict[str, Any]] = [
        {"lr": -0.1},
        {"lr": torch.tensor([0.1, 0.2])},
        {"momentum": -0.5},
        {"weight_decay": -1e-4},
        {"nesterov": True},
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        {"params": []},
        {"params": torch.zeros(2)},
        {"params": [{"params": [p]}, {"params": [p]}]},
        {"params": [("a", p), torch.zeros(1)]},
    ]
    for case in cases:
        want = _torch_error(**dict(case))
        assert _our_error(**dict(case)) == want, case
    assert "Invalid learning rate: -0.1" in _torch_error(lr=-0.1)
    # RemoteSGD's own, also before any request.
    q = torch.zeros(2, requires_grad=True)
    for kwargs, match in [
        ({"fused": True}, "fused=True"),
        ({"differentiable": True}, "differentiable=True"),
        ({"mode": "sync", "workers": 2}, "needs rank"),
        ({"mode": "sync", "workers": 2, "rank": 2}, "needs rank"),
        ({"rank": 0}, "go with mode='sync'"),
        ({"mode": "bounded"}, "needs max_staleness"),
        ({"params": [torch.zeros(2, dtype=torch.float16)]}, "float32 and float64"),
        ({"params": [("a", p), ("a", q)]}, "two parameters are named 'a'"),
        ({"params": [("a b", p)]}, "cannot be a parameter name"),
        ({"params": [p, p]}, "given to the optimizer twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            RemoteSGD(**{"params": [p], **kwargs}, model="m", url=NOWHERE)
    with pytest.raises(ValueError, match=r"url= .* or client="):
        RemoteSGD([p], model="m")


def test_an_existing_model_is_joined_or_refused(client: mc.Client) -> None:
    # Joined: its values are adopted, its groups become the optimizer's.
    joined = _name("joined")
    client.create_model(joined, lr=1.0, groups=[{"params": ["*"], "lr": 2.0}])
    client.init_params(joined, {"0": np.full(2, 3.0, np.float32)})
    w = torch.zeros(2, requires_grad=True)
    RemoteSGD([w], lr=0.1, momentum=0.9, model=joined, client=client)
    assert w.tolist() == [3.0, 3.0]
    groups = client.get_model(joined).groups
    assert [(g["name"], g["params"], g["lr"], g["momentum"]) for g in groups] == [("0", ["0"], 0.1, 0.9)]
    # Refused: another mode (or rule), or missing with create=False.
    name = _name("other")
    client.create_model(name, lr=0.1, momentum=0.9, mode="sync", workers=2)
    with pytest.raises(ValueError, match=r"has mode='sync', workers=2; this optimizer asks for mode='async'"):
        RemoteSGD([torch.zeros(2, requires_grad=True)], lr=0.1, momentum=0.9, model=name, client=client)
    with pytest.raises(mc.NotFound):
        RemoteSGD([torch.zeros(2, requires_grad=True)], model=_name("missing"), client=client, create=False)
    assert client.get_model(name).params == {}


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, momentum_client\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_metrics_go_with_the_step_into_the_series(client: mc.Client) -> None:
    model = _name("metrics")
    net = _net()
    opt = RemoteSGD(net.parameters(), lr=0.01, momentum=0.9, model=model, client=client)
    losses = []
    for k in range(3):
        x, y = _batch(k, torch.float32)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(metrics={"loss": loss.detach(), "k": k})  # a 0-d tensor and an int
        losses.append(loss.item())
    body = httpx.get(f"{client.base_url}/v1/models/{model}/metrics").json()
    assert [p["metrics"] for p in body["points"]] == [{"loss": v, "k": float(k)} for k, v in enumerate(losses)]
    assert [p["step"] for p in body["points"]] == [1, 2, 3]
    client.delete_model(model)
