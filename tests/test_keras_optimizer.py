"""``momentum_client.keras.RemoteSGD`` on the torch backend, against a real server process.

The reference is the server's own ``keras`` rule run locally (``KerasSGD.update``, numpy) on a
twin model: same initial weights, same batches, gradients computed by Keras on torch in a custom
loop of this file. ``fit`` and ``apply_gradients`` with ``RemoteSGD`` must give its weights bit for
bit. Keras' own ``SGD`` on torch rounds differently; how far it ends up is measured and bounded,
and shown to be non-zero (so the bitwise tests could tell the two apart).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import momentum_client as mc
import numpy as np
import pytest
from momentum_service.kernels.rules import KerasSGD

from .helpers import ServerProcess

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"RemoteSGD is tested on the torch backend, not {keras.backend.backend()}", allow_module_level=True)
torch = pytest.importorskip("torch")

from momentum_client.keras import RemoteSGD  # noqa: E402

# Keras 3.15's fit turns its logs into numbers with np.array(torch_tensor), which numpy 2 warns
# about once per batch (keras/src/backend/torch/core.py convert_to_numpy); not this code's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

N, BATCH = 256, 32  # 8 steps per epoch
LR = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: torch's second thread only contends (10x slower steps)."""
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


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 8)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], axis=1).astype(np.float32)
    return x, y


def _net() -> Any:
    """A small MLP, named so that every instance has the same variable paths; the same weights every time."""
    net = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )
    rng = np.random.default_rng(1)
    net.set_weights([(rng.normal(size=tuple(v.shape)) * 0.5).astype(np.float32) for v in net.trainable_variables])
    return net


def _weights(net: Any) -> dict[str, np.ndarray]:
    return {v.path: v.value.detach().cpu().numpy().copy() for v in net.trainable_variables}


def _batches(epochs: int) -> Iterator[tuple[Any, Any]]:
    x, y = _data()
    for _ in range(epochs):
        for i in range(0, N, BATCH):
            yield torch.from_numpy(x[i : i + BATCH]), torch.from_numpy(y[i : i + BATCH])


def _gradients(net: Any, x: Any, y: Any) -> list[Any]:
    """The gradients of the mean squared error, as Keras' torch trainer computes them."""
    for v in net.trainable_variables:
        v.value.grad = None
    loss = keras.losses.MeanSquaredError()(y, net(x, training=True))
    loss.backward()
    return [v.value.grad for v in net.trainable_variables]


def _train_with_kernel(
    net: Any, rule: KerasSGD, epochs: int, lr_of: Callable[[int], float] = lambda k: LR, clipvalue: float | None = None
) -> None:
    """The twin: gradients from Keras on torch, the update from the server's rule run here."""
    velocities: dict[str, np.ndarray | None] = {v.path: None for v in net.trainable_variables}
    for k, (x, y) in enumerate(_batches(epochs)):
        grads = _gradients(net, x, y)
        with torch.no_grad():
            for v, g in zip(net.trainable_variables, grads, strict=True):
                grad = g.numpy()
                if clipvalue is not None:
                    grad = np.clip(grad, -clipvalue, clipvalue)  # exact: no rounding to differ in
                value, velocities[v.path] = rule.update(
                    v.value.detach().numpy().copy(), velocities[v.path], grad, lr_of(k)
                )
                v.assign(value)


def _fit(net: Any, optimizer: Any, epochs: int) -> None:
    x, y = _data()
    net.compile(optimizer=optimizer, loss="mse")
    net.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


# (the rule's hyperparameters, RemoteSGD's extra arguments)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "momentum": ({"momentum": 0.9}, {}),
    "nesterov": ({"momentum": 0.9, "nesterov": True}, {}),
    "weight_decay": ({"momentum": 0.9, "weight_decay": 0.01}, {}),
    "plain": ({"momentum": 0.0}, {}),
    "loss_scale": ({"momentum": 0.9}, {"loss_scale_factor": 1024.0}),  # a power of 2: unscaling is exact
}


@pytest.mark.parametrize(("rule", "extra"), CONFIGS.values(), ids=CONFIGS.keys())
def test_fit_is_bitwise_the_keras_rule(client: mc.Client, rule: dict[str, Any], extra: dict[str, Any]) -> None:
    remote, twin = _net(), _net()
    optimizer = RemoteSGD(learning_rate=LR, **rule, **extra, model=_name("fit"), client=client)
    _fit(remote, optimizer, epochs=3)
    _train_with_kernel(twin, KerasSGD(lr=LR, **rule), epochs=3)
    assert optimizer.iterations.value.item() == 3 * N // BATCH
    got, want = _weights(remote), _weights(twin)
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}
    assert _max_diff(got, _weights(_net())) > 0.01  # it trained
    # The negative control: Keras' own SGD on torch does not give these bits (within 24 steps already).
    local = _net()
    _fit(local, keras.optimizers.SGD(learning_rate=LR, **rule, **extra), epochs=3)
    assert {k: v.tobytes() for k, v in _weights(local).items()} != {k: v.tobytes() for k, v in want.items()}
    # The server holds the same values, under the variables' paths with . for /.
    on_server = client.get_params(optimizer.model)
    assert {k: v.tobytes() for k, v in on_server.items()} == {k.replace("/", "."): v.tobytes() for k, v in want.items()}


def test_apply_gradients_in_a_custom_loop(client: mc.Client) -> None:
    remote, twin = _net(), _net()
    optimizer = RemoteSGD(learning_rate=LR, momentum=0.9, nesterov=True, model=_name("loop"), client=client)
    for x, y in _batches(2):
        grads = _gradients(remote, x, y)
        with torch.no_grad():
            optimizer.apply_gradients(zip(grads, remote.trainable_variables, strict=True))
    _train_with_kernel(twin, KerasSGD(lr=LR, momentum=0.9, nesterov=True), epochs=2)
    assert optimizer.iterations.value.item() == 2 * N // BATCH
    assert {k: v.tobytes() for k, v in _weights(remote).items()} == {k: v.tobytes() for k, v in _weights(twin).items()}


def test_clipvalue_is_applied_before_the_push(client: mc.Client) -> None:
    remote, twin = _net(), _net()
    _fit(remote, RemoteSGD(learning_rate=LR, momentum=0.9, clipvalue=0.05, model=_name("clip"), client=client), 2)
    _train_with_kernel(twin, KerasSGD(lr=LR, momentum=0.9), epochs=2, clipvalue=0.05)
    assert {k: v.tobytes() for k, v in _weights(remote).items()} == {k: v.tobytes() for k, v in _weights(twin).items()}


def test_a_learning_rate_schedule_is_followed_step_by_step(client: mc.Client) -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    remote, twin = _net(), _net()
    optimizer = RemoteSGD(learning_rate=schedule, momentum=0.9, model=_name("schedule"), client=client)
    _fit(remote, optimizer, epochs=2)
    lrs = [float(schedule(k).item()) for k in range(2 * N // BATCH)]
    assert len(set(lrs)) == len(lrs)  # a new lr every step: an update_model before each
    _train_with_kernel(twin, KerasSGD(lr=0.1, momentum=0.9), epochs=2, lr_of=lambda k: lrs[k])
    assert {k: v.tobytes() for k, v in _weights(remote).items()} == {k: v.tobytes() for k, v in _weights(twin).items()}
    assert np.float32(client.get_model(optimizer.model).optimizer.lr) == np.float32(lrs[-1])

    # A changed learning_rate (as ReduceLROnPlateau sets it) reaches the server before the next step.
    fixed = RemoteSGD(learning_rate=0.1, momentum=0.9, model=_name("set-lr"), client=client)
    net = _net()
    x, y = next(_batches(1))
    for lr in [0.1, 0.025]:
        fixed.learning_rate = lr
        grads = _gradients(net, x, y)
        with torch.no_grad():
            fixed.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        assert client.get_model(fixed.model).optimizer.lr == lr


def test_within_a_tolerance_of_keras_sgd_on_torch_but_not_equal(client: mc.Client) -> None:
    """~200 steps: Keras' own SGD on torch rounds differently (fused torch._foreach ops), the
    remote keras rule as TensorFlow does; the weights (values up to ~1.5) stay within 1e-5."""
    epochs = 25  # 200 steps
    measured = {}
    for label, config in [("plain", {"momentum": 0.9}), ("nesterov", {"momentum": 0.9, "nesterov": True})]:
        remote, local = _net(), _net()
        _fit(remote, RemoteSGD(learning_rate=LR, **config, model=_name("tol"), client=client), epochs)
        _fit(local, keras.optimizers.SGD(learning_rate=LR, **config), epochs)
        measured[label] = _max_diff(_weights(remote), _weights(local))
        scale = max(float(np.max(np.abs(w))) for w in _weights(local).values())
        print(f"max |dw| vs keras SGD on torch, {label}, 200 steps: {measured[label]:.3g} (max |w| {scale:.3g})")
    assert all(d < 1e-5 for d in measured.values()), measured
    assert all(d > 0 for d in measured.values()), measured  # the negative control: not the same rounding


def test_workers_starting_together_share_the_first_values(client: mc.Client) -> None:
    name = _name("workers")
    first, second = _net(), _net()
    second.set_weights([w + 1 for w in _weights(second).values()])
    a = RemoteSGD(learning_rate=LR, momentum=0.9, model=name, client=client)
    b = RemoteSGD(learning_rate=LR, momentum=0.9, model=name, client=client)
    a.connect(first.trainable_variables)
    b.connect(second.trainable_variables)
    assert {k: v.tobytes() for k, v in _weights(second).items()} == {k: v.tobytes() for k, v in _weights(first).items()}
    assert set(client.get_model(name).params) == {
        "net.hidden.kernel",
        "net.hidden.bias",
        "net.out.kernel",
        "net.out.bias",
    }


def test_a_loaded_model_is_refused_rather_than_trained_as_a_copy(client: mc.Client, tmp_path: Path) -> None:
    """keras.models.load_model names the variables differently (hidden/kernel, not net/hidden/kernel)."""
    name, path = _name("loaded"), tmp_path / "net.keras"
    net = _net()
    _fit(net, RemoteSGD(learning_rate=LR, momentum=0.9, model=name, client=client), epochs=1)
    net.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, RemoteSGD) and loaded.optimizer.model == name
    assert [v.path for v in loaded.trainable_variables] != [v.path for v in net.trainable_variables]
    x, y = _data()
    with pytest.raises(ValueError, match="paths differ"):
        loaded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert set(client.get_model(name).params) == {v.path.replace("/", ".") for v in net.trainable_variables}


def test_bad_arguments_fail_as_keras_sgd_does() -> None:
    for momentum in [1.5, -0.1, 1]:
        with pytest.raises(ValueError, match="momentum") as keras_error:
            keras.optimizers.SGD(momentum=momentum)
        with pytest.raises(ValueError, match="momentum") as ours:
            RemoteSGD(momentum=momentum, model="m", url="http://localhost:1")
        assert str(ours.value) == str(keras_error.value) == "`momentum` must be a float between [0, 1]."
    with pytest.raises(ValueError, match="use_ema"):
        RemoteSGD(use_ema=True, model="m", url="http://localhost:1")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        RemoteSGD(gradient_accumulation_steps=2, model="m", url="http://localhost:1")
    with pytest.raises(ValueError, match=r"url= .* or client="):
        RemoteSGD(model="m")
    with pytest.raises(ValueError, match="Argument\\(s\\) not recognized"):
        RemoteSGD(model="m", url="http://localhost:1", moment=0.9)


def test_a_model_with_another_rule_or_mode_is_refused(client: mc.Client) -> None:
    torch_rule, sync = _name("torch-rule"), _name("sync")
    client.create_model(torch_rule, lr=LR, momentum=0.9)
    client.create_model(sync, lr=LR, momentum=0.9, rule="keras", mode="sync", workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mc.ModelConfigWarning)
        optimizer = RemoteSGD(learning_rate=LR, momentum=0.9, model=torch_rule, client=client)
        with pytest.raises(ValueError, match="rule 'pytorch'; RemoteSGD needs the rule 'keras'"):
            optimizer.connect(_net().trainable_variables)
        optimizer = RemoteSGD(learning_rate=LR, momentum=0.9, model=sync, client=client)
        with pytest.raises(ValueError, match="'sync' mode"):
            optimizer.connect(_net().trainable_variables)
    assert client.get_model(torch_rule).params == {} and client.get_model(sync).params == {}


def test_get_config_round_trips_the_keras_settings(client: mc.Client) -> None:
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.1, 0.01])
    optimizer = RemoteSGD(
        learning_rate=schedule, momentum=0.9, nesterov=True, weight_decay=1e-4, clipnorm=1.0, model="m", client=client
    )
    config = optimizer.get_config()
    assert "client" not in config and "api_key" not in config
    assert (config["model"], config["url"], config["create"]) == ("m", client.base_url, True)
    again = RemoteSGD.from_config(copy.deepcopy(config))  # from_config replaces the schedule's dict in place
    assert again.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is RemoteSGD and restored.get_config() == config


def test_importing_the_client_does_not_import_keras() -> None:
    code = "import sys, momentum_client\nassert 'keras' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
