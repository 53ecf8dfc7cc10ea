"""The Python SDK against the real app, in process: ``Client`` over starlette's ``TestClient``
and ``AsyncClient`` over ``httpx.ASGITransport``, with the in-memory store."""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_client import _tensors
from momentum_service.api.app import create_app
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal
from starlette.testclient import TestClient

from .helpers import Api

Connect = Callable[..., Api]


@pytest.fixture(params=["sync-safetensors", "async-safetensors", "sync-json", "async-json"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """``connect(settings=None)``: a client of the parametrized kind and wire format on a fresh in-process server."""
    kind, wire = request.param.split("-")
    async with AsyncExitStack() as stack:

        def make(settings: Settings | None = None, **options: Any) -> Api:
            app = create_app(settings or Settings(), journal=MemoryJournal())
            if kind == "sync":
                test_client = stack.enter_context(TestClient(app))
                sync = mc.Client("http://testserver", client=test_client, wire=wire, **options)
                return Api(stack.enter_context(sync))
            transport = httpx.ASGITransport(app=app)
            client = mc.AsyncClient("http://test", transport=transport, wire=wire, **options)
            stack.push_async_callback(client.close)
            return Api(client)

        yield make


async def test_rule_and_schedule_through_the_sdk(connect: Connect) -> None:
    api = connect()
    schedule = {"type": "step", "step_size": 2, "gamma": 0.5}
    info = await api("create_model", "k", lr=0.4, momentum=0.5, rule="keras", weight_decay=0.01, schedule=schedule)
    assert info.optimizer == mc.OptimizerConfig(lr=0.4, momentum=0.5, weight_decay=0.01, rule="keras")
    assert info.schedule == schedule
    await api("init_params", "k", {"w": np.ones(3, np.float32)})
    results = [await api("step_results", "k", {"w": np.ones(3, np.float32)}) for _ in range(3)]
    assert [r["w"].lr for r in results] == [0.4, 0.4, 0.2]
    assert [r["w"].step for r in results] == [1, 2, 3]
    info = await api("update_model", "k", lr=0.8, schedule={"type": "constant"})
    assert info.optimizer.lr == 0.8 and info.schedule == {"type": "constant"}
    pushed = await api("step_results", "k", {"w": np.ones(3, np.float32)}, return_params=False)
    assert (pushed["w"].value, pushed["w"].step, pushed["w"].lr) == (None, 4, 0.8)
    with pytest.raises(mc.Conflict, match="rule"):
        await api("replace_model", "k", lr=0.1)  # the default rule is pytorch: 409 rule-change
    with pytest.raises(mc.InvalidRequest, match="dampening"):
        await api("update_model", "k", dampening=0.1)  # keras has no dampening


async def test_model_and_parameter_lifecycle(connect: Connect) -> None:
    api = connect()
    assert await api("health") is True
    assert await api("ready") is True
    info = await api("create_model", "mlp", lr=0.1, momentum=0.9)
    assert info == mc.ModelInfo("mlp", mc.OptimizerConfig(lr=0.1, momentum=0.9), {})
    assert await api("init_params", "mlp", {"layer:0.w": np.ones((2, 3), np.float32), "b": np.zeros(3)}) == {
        "layer:0.w": True,
        "b": True,
    }
    info = await api("update_model", "mlp", lr=0.5, nesterov=True)
    assert info.optimizer == mc.OptimizerConfig(lr=0.5, momentum=0.9, nesterov=True)
    assert info.params == {"layer:0.w": mc.ParamInfo((2, 3), "float32", 0), "b": mc.ParamInfo((3,), "float64", 0)}
    assert await api("get_model", "mlp") == info

    state = await api("get_param_state", "mlp", "b")
    assert (state.step, state.velocity) == (0, None)
    new = await api("step", "mlp", {"layer:0.w": np.full((2, 3), 0.25, np.float32)})
    assert list(new) == ["layer:0.w"]
    assert new["layer:0.w"].dtype == np.float32
    assert await api("push_gradients", "mlp", {"layer:0.w": np.zeros((2, 3), np.float32), "b": [1.0, 2.0, 3.0]}) == {
        "layer:0.w": 2,
        "b": 1,
    }
    values = await api("get_params", "mlp")
    assert values.keys() == {"layer:0.w", "b"}
    assert (await api("get_params", "mlp", ["b"])).keys() == {"b"}
    state = await api("get_param_state", "mlp", "layer:0.w")
    assert state.step == 2
    assert state.velocity is not None
    assert state.value.tobytes() == values["layer:0.w"].tobytes()

    await api("delete_param", "mlp", "b")
    with pytest.raises(mc.NotFound):
        await api("get_param_state", "mlp", "b")
    await api("delete_model", "mlp")
    with pytest.raises(mc.NotFound) as missing:
        await api("get_model", "mlp")
    assert missing.value.type == "urn:momentum-service:problem:model-not-found"


CONFIGS = [
    (np.float32, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    (np.float64, {"lr": 0.05, "momentum": 0.5, "dampening": 0.1, "maximize": True}),
    (np.float32, {"lr": 0.01}),
]


@pytest.mark.parametrize(("dtype", "config"), CONFIGS)
async def test_steps_are_bitwise_those_of_torch_sgd(connect: Connect, dtype: type, config: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    api = connect()
    rng = np.random.default_rng(7)
    shapes = {"w": (33, 17), "b": (5,), "s": ()}
    init: dict[str, np.ndarray] = {n: np.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    tparams = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in init.items()}
    opt = torch.optim.SGD(list(tparams.values()), **config)
    await api("create_model", "m", **config)
    await api("init_params", "m", init, exist_ok=True)
    for k in range(25):
        if k == 10:  # a hyperparameter change applies from the next step, on both sides
            await api("update_model", "m", lr=config["lr"] / 2)
            opt.param_groups[0]["lr"] = config["lr"] / 2
        grads: dict[str, np.ndarray] = {n: np.asarray(rng.standard_normal(s) * 0.1, dtype) for n, s in shapes.items()}
        for n, g in grads.items():
            tparams[n].grad = torch.from_numpy(g.copy())
        opt.step()
        ours = await api("step", "m", grads)
        for n, tp in tparams.items():
            assert ours[n].dtype == dtype
            assert ours[n].tobytes() == tp.detach().numpy().tobytes(), (k, n)
    for n, tp in tparams.items():
        state = await api("get_param_state", "m", n)
        buf = opt.state[tp].get("momentum_buffer")
        assert state.step == 25
        if buf is None:
            assert state.velocity is None
        else:
            assert state.velocity is not None
            assert state.velocity.tobytes() == buf.numpy().tobytes()


@pytest.mark.parametrize("codec", ["orjson", "json"])
async def test_float_bits_survive_the_server(connect: Connect, codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if codec == "json":
        monkeypatch.setattr(_tensors, "_orjson", None)
    api = connect()
    await api("create_model", "m", lr=0.1)
    rng = np.random.default_rng(3)
    f32 = rng.integers(0, 2**32, size=4096, dtype=np.uint32).view(np.float32)
    f64 = rng.integers(0, 2**64, size=4096, dtype=np.uint64).view(np.float64)
    extremes32 = np.array([np.finfo(np.float32).smallest_subnormal, -0.0, np.finfo(np.float32).max], np.float32)
    values = {
        "f32": np.concatenate([extremes32, f32[np.isfinite(f32)]]),
        "f64": np.concatenate([[5e-324, -0.0, np.finfo(np.float64).max], f64[np.isfinite(f64)]]),
    }
    await api("init_params", "m", values)
    back = await api("get_params", "m")
    for n, v in values.items():
        assert back[n].dtype == v.dtype
        assert back[n].tobytes() == v.tobytes(), n


async def test_exist_ok_never_resets_trained_state(connect: Connect) -> None:
    api = connect()
    await api("create_model", "m", lr=0.1, momentum=0.9)
    assert await api("init_params", "m", {"w": np.ones(4, np.float32)}, exist_ok=True) == {"w": True}
    trained = (await api("step", "m", {"w": np.ones(4, np.float32)}))["w"]
    again = await api("init_params", "m", {"w": np.zeros(4, np.float32), "v": np.zeros(2)}, exist_ok=True)
    assert again == {"w": False, "v": True}
    state = await api("get_param_state", "m", "w")
    assert state.step == 1
    assert state.value.tobytes() == trained.tobytes()
    assert await api("init_params", "m", {"w": np.zeros(4, np.float32)}) == {"w": False}
    state = await api("get_param_state", "m", "w")
    assert (state.step, state.velocity) == (0, None)
    assert state.value.tobytes() == np.zeros(4, np.float32).tobytes()


async def test_concurrent_exist_ok_initializations_create_each_parameter_once() -> None:
    app = create_app(Settings(), journal=MemoryJournal())
    async with mc.AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as client:
        await client.create_model("m", lr=0.1)
        names = [f"p{i}" for i in range(6)]

        async def worker(k: int) -> dict[str, bool]:
            mine = {n: np.full(3, k, np.float32) for j, n in enumerate(names) if (j + k) % 3 != 0}
            return await client.init_params("m", mine, exist_ok=True)

        results = await asyncio.gather(*(worker(k) for k in range(8)))
        final = await client.get_params("m")
    for n in names:
        creators = [k for k, r in enumerate(results) if r.get(n)]
        assert len(creators) == 1, (n, results)
        assert final[n].tobytes() == np.full(3, creators[0], np.float32).tobytes()


async def test_server_errors_map_to_exceptions(connect: Connect) -> None:
    api = connect(Settings(max_tensor_elements=16))
    with pytest.raises(mc.NotFound) as info:
        await api("get_model", "nope")
    assert info.value.status == 404
    await api("create_model", "m", lr=0.1)
    await api("init_params", "m", {"w": np.zeros((2, 2), np.float32)})
    with pytest.raises(mc.NotFound):
        await api("get_param_state", "m", "absent")
    with pytest.raises(mc.Conflict) as conflict:
        await api("step", "m", {"w": np.zeros((2, 2), np.float64)})
    assert type(conflict.value) is mc.TensorMismatch
    assert conflict.value.type == "urn:momentum-service:problem:tensor-mismatch"
    with pytest.raises(mc.InvalidRequest) as invalid:
        await api("replace_model", "m", lr=0.1, nesterov=True)
    assert invalid.value.errors
    assert all("loc" in e and "msg" in e for e in invalid.value.errors)
    with pytest.raises(mc.InvalidRequest):
        await api("update_model", "m", lr=-1.0)
    with pytest.raises(mc.PayloadTooLarge):
        await api("init_params", "m", {"big": np.zeros(17, np.float32)})
    assert (await api("get_model", "m")).optimizer.lr == 0.1


async def test_create_model_never_changes_an_existing_model(connect: Connect) -> None:
    """What every worker runs at start-up must not undo a PATCHed lr or momentum."""
    api = connect()
    await api("create_model", "m", lr=0.1, momentum=0.9)
    await api("init_params", "m", {"w": np.ones(2, np.float32)})
    await api("step", "m", {"w": np.ones(2, np.float32)})
    await api("update_model", "m", lr=0.05)
    with pytest.raises(mc.ModelExists) as exists:
        await api("create_model", "m", lr=0.1, momentum=0.9)
    assert exists.value.status == 412 and exists.value.existing_config["optimizer"]["lr"] == 0.05
    with pytest.warns(mc.ModelConfigWarning, match=r"optimizer\.lr: asked 0\.1, the model has 0\.05"):
        info = await api("create_model", "m", lr=0.1, momentum=0.9, exist_ok=True)
    assert (info.optimizer.lr, info.optimizer.momentum, info.params["w"].step) == (0.05, 0.9, 1)
    with pytest.warns(mc.ModelConfigWarning, match=r"optimizer\.momentum: asked 0\.0"):
        await api("create_model", "m", lr=0.05, exist_ok=True)  # momentum left at its default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same config: no warning
        info = await api("create_model", "m", lr=0.05, momentum=0.9, exist_ok=True)
    assert info.optimizer.lr == 0.05
    assert (await api("get_param_state", "m", "w")).step == 1  # nothing reset
    info = await api("replace_model", "m", lr=0.5)
    assert (info.optimizer.lr, info.optimizer.momentum) == (0.5, 0.0)


async def test_a_float64_gradient_for_a_float32_parameter(connect: Connect) -> None:
    api = connect()
    await api("create_model", "m", lr=0.5)
    await api("init_params", "m", {"w": np.ones(3, np.float32)})
    grad = np.array([0.1, 0.2, 0.3])  # numpy's default dtype: float64
    with pytest.raises(mc.TensorMismatch) as mismatch:
        await api("step", "m", {"w": grad})
    text = str(mismatch.value)
    assert "gradient 'w' is float64 but the parameter is float32" in text
    assert "grad.astype(np.float32)" in text and "cast_gradients=True" in text

    casting = connect(cast_gradients=True)
    await casting("create_model", "m", lr=0.5)
    await casting("init_params", "m", {"w": np.ones(3, np.float32)})
    for _ in range(2):  # the first step learns the dtype from the 409, the second casts at once
        values = await casting("step", "m", {"w": grad})
        assert values["w"].dtype == np.float32
    expected = np.ones(3, np.float32) - np.float32(0.5) * grad.astype(np.float32)
    expected = expected - np.float32(0.5) * grad.astype(np.float32)
    np.testing.assert_array_equal(values["w"], expected)
    assert (await casting("get_param_state", "m", "w")).step == 2


async def test_torch_tensors_go_in_as_they_are(connect: Connect) -> None:
    """Tensors that require grad, and bfloat16/float16 gradients, which numpy cannot take directly."""
    torch = pytest.importorskip("torch")
    api = connect()
    await api("create_model", "m", lr=1.0)
    layer = torch.nn.Linear(2, 2)
    await api("init_params", "m", dict(layer.named_parameters()))  # requires_grad=True
    start = await api("get_params", "m")
    np.testing.assert_array_equal(start["weight"], layer.weight.detach().numpy())
    bf16 = torch.tensor([[0.5, -1.5], [3.0, 0.25]], dtype=torch.bfloat16)
    half = torch.tensor([0.5, -0.25], dtype=torch.float16)
    values = await api("step", "m", {"weight": bf16, "bias": half})
    np.testing.assert_array_equal(values["weight"], start["weight"] - bf16.float().numpy())
    np.testing.assert_array_equal(values["bias"], start["bias"] - half.float().numpy())


async def test_a_push_with_a_base_step_reports_its_staleness(connect: Connect) -> None:
    api = connect()
    await api("create_model", "m", lr=0.1)
    await api("init_params", "m", {"w": np.ones(2, np.float32)})
    for _ in range(3):
        await api("step", "m", {"w": np.ones(2, np.float32)})
    result = await api("step_results", "m", {"w": np.ones(2, np.float32)}, base_step=1)
    assert (result["w"].step, result["w"].staleness) == (4, 2)
    assert (await api("step_results", "m", {"w": np.ones(2, np.float32)}))["w"].staleness is None
    with pytest.raises(mc.Conflict) as ahead:
        await api("step", "m", {"w": np.ones(2, np.float32)}, base_step=9)
    assert ahead.value.code == "stale-gradient"


async def test_groups_checkpoints_and_the_model_list_through_the_sdk(connect: Connect, tmp_path: Any) -> None:
    api = connect()
    groups = [{"params": ["*.bias"], "weight_decay": 0.0, "lr": 0.05}]
    info = await api("create_model", "net", lr=0.1, momentum=0.9, weight_decay=0.01, groups=groups)
    assert info.groups == ({"name": "0", "params": ["*.bias"], "weight_decay": 0.0, "lr": 0.05},)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await api("create_model", "net", lr=0.1, momentum=0.9, weight_decay=0.01, groups=groups, exist_ok=True)
        assert not caught  # the same groups: no warning
        await api("create_model", "net", lr=0.1, momentum=0.9, weight_decay=0.01, exist_ok=True, groups=[])
        assert any(issubclass(w.category, mc.ModelConfigWarning) and "groups" in str(w.message) for w in caught)
    values = {"fc.weight": np.ones((2, 2), np.float32), "fc.bias": np.ones(2, np.float32)}
    await api("init_params", "net", values)
    results = await api("step_results", "net", {n: np.ones_like(v) for n, v in values.items()})
    assert results["fc.bias"].lr == 0.05 and results["fc.weight"].lr == 0.1
    # weight decay 0.01 on the weight only (momentum's first step: the buffer is the gradient)
    assert results["fc.weight"].value[0, 0] == np.float32(1) - np.float32(0.1) * np.float32(1.01)
    assert results["fc.bias"].value[0] == np.float32(1) - np.float32(0.05)
    info = await api("update_model", "net", groups={"0": {"lr": 0.5}})
    assert info.groups[0]["lr"] == 0.5

    # Checkpoints: to a path, a file and bytes; restored bitwise, steps and velocities included.
    path = tmp_path / "net.safetensors"
    assert await api("save_checkpoint", "net", path) is None
    saved = bytes(await api("save_checkpoint", "net"))
    assert path.read_bytes() == saved
    buffer = io.BytesIO()
    await api("save_checkpoint", "net", buffer)
    assert buffer.getvalue() == saved
    before = await api("get_param_state", "net", "fc.weight")
    await api("step", "net", {n: np.ones_like(v) for n, v in values.items()})
    await api("delete_model", "net")
    info = await api("load_checkpoint", "net", path)
    assert {n: p.step for n, p in info.params.items()} == {"fc.weight": 1, "fc.bias": 1}
    assert info.groups[0]["lr"] == 0.5
    after = await api("get_param_state", "net", "fc.weight")
    assert after.value.tobytes() == before.value.tobytes() and after.velocity.tobytes() == before.velocity.tobytes()
    with pytest.raises(mc.ModelExists):
        await api("load_checkpoint", "net", saved, replace=False)
    await api("load_checkpoint", "copy", memoryview(saved), replace=False)
    with pytest.raises(mc.InvalidRequest, match="format"):
        await api("load_checkpoint", "bad", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(mc.NotFound):
        await api("save_checkpoint", "nope")

    # The list: every model, in name order, across pages.
    for name in ("a", "b", "c"):
        await api("create_model", name, lr=0.1, rule="keras")
    listed = await api("list_models", page_size=2)
    assert [m.name for m in listed] == ["a", "b", "c", "copy", "net"]
    assert listed[-1] == mc.ModelSummary("net", "pytorch", "async", 2, 1)
    with pytest.raises(ValueError, match="page_size"):
        await api("list_models", page_size=0)
