"""The SDK's exactly-once step retries and sync-mode waiting.

Against an ``httpx.MockTransport`` fake server (both clients, no real sleeping: a fake clock that
sleeping advances records the waits), then against the real app in process."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_service.api.app import create_app
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal
from starlette.testclient import TestClient

from .helpers import Api
from .test_client_unit import BASE, Handler, Server, body_of, ok, problem, tensor

GRADS = {"w": np.array([1.0, 2.0], np.float32)}
RESULT = {"params": {"w": {"step": 1, "lr": 0.1, **tensor(np.array([0.5, 0.25], np.float32))}}}
STEP_METHODS = ["step", "step_results", "push_gradients"]


class Clock:
    """A fake monotonic clock; sleeping advances it, and the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Half(random.Random):
    """Jitter that always draws the middle: the n-th backoff is 0.5 * min(2, 0.05 * 2**n)."""

    def random(self) -> float:
        return 0.5


Connect = Callable[..., tuple[Api, Server, Clock]]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """``connect(*answers, rng=Half(), **client_kwargs)`` -> (api, server, clock) over a mock server."""
    clients: list[mc.Client | mc.AsyncClient] = []

    def make(
        *answers: httpx.Response | Handler | Exception, rng: random.Random | None = None, **kwargs: Any
    ) -> tuple[Api, Server, Clock]:
        server, clock = Server(*answers), Clock()
        transport = httpx.MockTransport(server)
        kwargs.setdefault("wire", "json")  # the fake server answers in JSON
        client: mc.Client | mc.AsyncClient
        if request.param == "sync":
            client = mc.Client(BASE, transport=transport, **kwargs)
            client._sleep = clock.sleep
        else:
            client = mc.AsyncClient(BASE, transport=transport, **kwargs)
            client._sleep = clock.async_sleep
        client._clock = clock
        client._random = rng or Half()
        clients.append(client)
        return Api(client), server, clock

    yield make
    for c in clients:
        if isinstance(c, mc.AsyncClient):
            await c.close()
        else:
            c.close()


def in_flight() -> httpx.Response:
    response = problem(409, "idempotency-in-flight", "the first attempt is still running")
    response.headers["Retry-After"] = "1"
    return response


def unavailable(retry_after: str | None = None, detail: str = "store down") -> httpx.Response:
    response = problem(503, "store-unavailable", detail)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def pending(counts: int = 1, workers: int = 2, retry_after: str | None = "0", base_step: int = 0) -> httpx.Response:
    body = {
        "status": "pending",
        "base_step": base_step,
        "workers": workers,
        "contributions": {"w": counts},
        "detail": "waiting",
    }
    return httpx.Response(202, json=body, headers={} if retry_after is None else {"Retry-After": retry_after})


def keys(server: Server) -> list[str]:
    return [r.headers["idempotency-key"] for r in server.requests]


# -- retries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", STEP_METHODS)
async def test_the_same_bytes_and_key_are_resent_on_every_transient_failure(connect: Connect, method: str) -> None:
    api, server, clock = connect(
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        unavailable(retry_after="3"),
        in_flight(),
        httpx.RemoteProtocolError("peer closed"),
        ok(RESULT),
    )
    result = await api(method, "m", GRADS, expected_steps={"w": 0})
    assert len(server.requests) == 6
    assert len(set(keys(server))) == 1
    assert re.fullmatch("[0-9a-f]{32}", keys(server)[0])
    assert len({r.content for r in server.requests}) == 1
    assert body_of(server.requests[0])["expected_steps"] == {"w": 0}
    assert {(r.method, r.url.path) for r in server.requests} == {("POST", "/v1/models/m/step")}
    # jitter 0.5 of 0.05 * 2**n; Retry-After 3 capped at 2 s; in-flight's Retry-After 1
    assert clock.sleeps == [0.025, 0.05, 2.0, 1.0, 0.4]
    if method == "push_gradients":
        assert result == {"w": 1}
    elif method == "step":
        assert result["w"].tobytes() == np.array([0.5, 0.25], np.float32).tobytes()
    else:
        assert (result["w"].step, result["w"].replayed) == (1, False)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("connect"),
        httpx.ReadTimeout("read"),
        httpx.WriteTimeout("write"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("peer closed"),
        "503",
        "503-contention",
        "409-in-flight",
        "502",
        "504",
    ],
)
async def test_each_transient_failure_is_retried(
    connect: Connect, failure: Exception | str, caplog: pytest.LogCaptureFixture
) -> None:
    answer: httpx.Response | Exception
    if failure == "503":
        answer = unavailable()
    elif failure == "503-contention":
        answer = problem(503, "contention", "too many writers")
    elif failure == "409-in-flight":
        answer = in_flight()
    elif failure in ("502", "504"):
        answer = httpx.Response(int(failure), text="bad gateway")  # a proxy's page, not problem+json
    else:
        assert isinstance(failure, Exception)
        answer = failure
    api, server, _ = connect(answer, ok(RESULT))
    with caplog.at_level(logging.INFO, logger="momentum_client"):
        assert await api("push_gradients", "m", GRADS) == {"w": 1}
    assert len(server.requests) == 2
    assert server.requests[0].content == server.requests[1].content
    assert len(set(keys(server))) == 1
    retries = [r for r in caplog.records if r.name == "momentum_client"]  # the SDK logs each retry
    assert (
        len(retries) == 1
        and "retry 1 of" in retries[0].getMessage()
        and "same Idempotency-Key" in retries[0].getMessage()
    )
    assert keys(server)[0] not in retries[0].getMessage()


@pytest.mark.parametrize(
    ("answer", "cls", "code"),
    [
        ((409, "step-mismatch"), mc.Conflict, "step-mismatch"),
        ((409, "stale-gradient"), mc.Conflict, "stale-gradient"),
        ((409, "step-already-applied"), mc.Conflict, "step-already-applied"),
        ((409, "tensor-mismatch"), mc.TensorMismatch, "tensor-mismatch"),
        ((422, "idempotency-key-reused"), mc.InvalidRequest, "idempotency-key-reused"),
        ((422, "mode-field-required"), mc.InvalidRequest, "mode-field-required"),
        ((404, "model-not-found"), mc.NotFound, "model-not-found"),
        ((500, "internal"), mc.ServerError, "internal"),
        ((501, None), mc.ServerError, None),
        ((400, "invalid-json"), mc.InvalidRequest, "invalid-json"),
        ((409, None), mc.Conflict, None),
    ],
)
async def test_other_errors_are_not_retried(
    connect: Connect, answer: tuple[int, str | None], cls: type[mc.APIError], code: str | None
) -> None:
    status, slug = answer
    reply = problem(status, slug, current_steps={"w": 3}) if slug else httpx.Response(status, text="not a problem")
    api, server, clock = connect(reply)
    with pytest.raises(mc.APIError) as info:
        await api("step", "m", GRADS)
    assert type(info.value) is cls
    assert info.value.code == code
    assert len(server.requests) == 1
    assert clock.sleeps == []


async def test_the_last_error_is_raised_after_max_retries(connect: Connect) -> None:
    api, server, clock = connect(*(unavailable(detail=f"attempt {i}") for i in range(1, 4)), max_retries=2)
    with pytest.raises(mc.ServiceUnavailable, match="attempt 3"):
        await api("step", "m", GRADS)
    assert len(server.requests) == 3
    assert clock.sleeps == [0.025, 0.05]

    errors = [httpx.ConnectError("first"), httpx.ReadTimeout("second"), httpx.ReadTimeout("third")]
    api, server, clock = connect(*errors, max_retries=2)
    with pytest.raises(mc.RequestTimeout) as info:
        await api("push_gradients", "m", GRADS)
    assert info.value.__cause__ is errors[2]
    assert info.value.url == f"{BASE}/v1/models/m/step"
    assert len(server.requests) == 3

    api, server, clock = connect(in_flight(), in_flight(), max_retries=1)
    with pytest.raises(mc.Conflict) as conflict:
        await api("step_results", "m", GRADS)
    assert conflict.value.code == "idempotency-in-flight"
    assert conflict.value.retry_after == 1.0
    assert len(server.requests) == 2


async def test_max_retries_zero_disables_retries(connect: Connect) -> None:
    api, server, clock = connect(httpx.ConnectError("refused"), max_retries=0)
    with pytest.raises(mc.TransportError):
        await api("step", "m", GRADS)
    api, server, clock = connect(unavailable(), max_retries=0)
    with pytest.raises(mc.ServiceUnavailable):
        await api("step", "m", GRADS)
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("retry_after", "slept"),
    [("0.3", 0.3), ("0", 0.0), ("1", 1.0), ("100", 2.0), ("soon", 0.025), (None, 0.025)],
)
async def test_retry_after_is_honoured_up_to_the_cap(connect: Connect, retry_after: str | None, slept: float) -> None:
    api, server, clock = connect(unavailable(retry_after), ok(RESULT))
    await api("push_gradients", "m", GRADS)
    assert clock.sleeps == [slept]
    assert len(server.requests) == 2


async def test_backoff_is_exponential_with_full_jitter(connect: Connect) -> None:
    api, server, clock = connect(*(unavailable() for _ in range(8)), ok(RESULT), rng=random.Random(42), max_retries=8)
    await api("push_gradients", "m", GRADS)
    draws = random.Random(42)
    ceilings = [min(2.0, 0.05 * 2**n) for n in range(8)]
    assert ceilings == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert clock.sleeps == [draws.random() * c for c in ceilings]
    assert all(0 <= s <= c for s, c in zip(clock.sleeps, ceilings, strict=True))
    assert len(server.requests) == 9


async def test_a_fresh_key_per_call_and_a_given_key_as_is(connect: Connect) -> None:
    w = RESULT["params"]["w"]
    api, server, _ = connect(*(ok({"params": {"w": {**w, "step": n}}}) for n in range(1, 6)))
    await api("step", "m", GRADS)
    await api("step", "m", GRADS)
    await api("step_results", "m", GRADS)
    await api("push_gradients", "m", GRADS)
    generated = keys(server)
    assert len(set(generated)) == 4
    assert all(re.fullmatch("[0-9a-f]{32}", k) for k in generated)
    assert len({r.content for r in server.requests}) == 2  # same body, different keys
    await api("push_gradients", "m", GRADS, idempotency_key='"worker-3/step-17"')
    assert server.requests[-1].headers["idempotency-key"] == '"worker-3/step-17"'


async def test_a_given_key_is_kept_across_retries(connect: Connect) -> None:
    api, server, _ = connect(httpx.ReadTimeout("lost"), unavailable(), ok(RESULT))
    await api("step", "m", GRADS, idempotency_key="job-1:batch-9")
    assert keys(server) == ["job-1:batch-9"] * 3


async def test_failures_in_a_row_are_counted_and_a_202_resets_them(connect: Connect) -> None:
    api, server, clock = connect(
        httpx.ConnectError("refused"),
        pending(),
        httpx.ConnectError("refused"),
        ok(RESULT),
        max_retries=1,
    )
    assert await api("push_gradients", "m", GRADS, worker_id=0, base_step=0) == {"w": 1}
    assert len(server.requests) == 4
    assert clock.sleeps == [0.025, 0.025]  # the backoff starts over after the 202


async def test_other_calls_are_not_retried(connect: Connect) -> None:
    api, server, clock = connect(unavailable("1"), httpx.ConnectError("refused"), unavailable("1"))
    with pytest.raises(mc.ServiceUnavailable):
        await api("get_model", "m")
    with pytest.raises(mc.TransportError):
        await api("get_params", "m")
    with pytest.raises(mc.ServiceUnavailable):
        await api("init_params", "m", {"w": np.zeros(2)})
    assert len(server.requests) == 3
    assert clock.sleeps == []
    assert all("idempotency-key" not in r.headers for r in server.requests)


async def test_health_probes_are_not_retried(connect: Connect) -> None:
    api, server, clock = connect(httpx.ConnectError("refused"), unavailable("1"))
    assert await api("health") is False
    assert await api("ready") is False
    assert len(server.requests) == 2
    assert clock.sleeps == []


# -- sync mode: 202 pending ------------------------------------------------------------------------


@pytest.mark.parametrize("method", STEP_METHODS)
async def test_a_pending_sync_step_is_resent_until_applied(connect: Connect, method: str) -> None:
    api, server, clock = connect(pending(1), pending(2, retry_after=None), pending(2, retry_after="0.5"), ok(RESULT))
    await api(method, "m", GRADS, worker_id=1, base_step=0)
    assert len(server.requests) == 4
    assert len(set(keys(server))) == 1
    assert len({r.content for r in server.requests}) == 1
    body = body_of(server.requests[0])
    assert (body["worker_id"], body["base_step"]) == (1, 0)
    assert clock.sleeps == [0.025, 0.5]  # Retry-After 0: at once; none: a short jittered wait


@pytest.mark.parametrize("method", STEP_METHODS)
async def test_step_timeout_after_sync_wait(connect: Connect, method: str) -> None:
    def long_poll(request: httpx.Request) -> httpx.Response:
        clock.now += 4.0  # the server waits for the other workers before answering 202
        return pending(counts=2, workers=3, base_step=7)

    api, server, clock = connect(long_poll, long_poll, long_poll, long_poll, sync_wait=10)
    with pytest.raises(mc.StepTimeout) as info:
        await api(method, "m", GRADS, worker_id=0, base_step=7)
    assert len(server.requests) == 3  # answered at 4 s, 8 s, then 12 s >= 10 s
    err = info.value
    assert (err.base_step, err.workers, err.contributions) == (7, 3, {"w": 2})
    assert isinstance(err, TimeoutError) and isinstance(err, mc.MomentumError)
    assert not isinstance(err, mc.TransportError)
    assert "base_step 7" in str(err) and "w: 2/3" in str(err)
    assert (err.method, err.url) == ("POST", f"{BASE}/v1/models/m/step")
    assert len(set(keys(server))) == 1


async def test_waits_for_a_sync_step_never_overrun_sync_wait(connect: Connect) -> None:
    api, server, clock = connect(pending(retry_after="5"), pending(retry_after="5"), sync_wait=1.5)
    with pytest.raises(mc.StepTimeout):
        await api("step", "m", GRADS, worker_id=0, base_step=0)
    assert clock.sleeps == [1.5]  # Retry-After 5, capped at 2 s, then at what is left of sync_wait
    assert len(server.requests) == 2


async def test_sync_wait_zero_raises_at_the_first_202(connect: Connect) -> None:
    api, server, clock = connect(pending(), sync_wait=0)
    with pytest.raises(mc.StepTimeout):
        await api("push_gradients", "m", GRADS, worker_id=0, base_step=0)
    assert len(server.requests) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize(
    "body",
    [{"status": "done"}, {"status": "pending", "base_step": 0}, [1, 2]],
)
async def test_a_malformed_202_is_unexpected(connect: Connect, body: Any) -> None:
    api, server, _ = connect(httpx.Response(202, json=body))
    with pytest.raises(mc.UnexpectedResponse) as info:
        await api("step", "m", GRADS, worker_id=0, base_step=0)
    assert info.value.status == 202
    assert len(server.requests) == 1


def test_default_sleep_clock_and_jitter() -> None:
    with mc.Client(BASE) as client:
        assert client._sleep is time.sleep
        assert client._clock is time.monotonic
        assert isinstance(client._random, random.Random)
    aclient = mc.AsyncClient(BASE)
    assert aclient._sleep is asyncio.sleep
    assert aclient._clock is time.monotonic


def test_the_sync_client_really_sleeps() -> None:
    server = Server(unavailable("0.01"), ok(RESULT))
    with mc.Client(BASE, transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        assert client.push_gradients("m", GRADS) == {"w": 1}
        assert time.monotonic() - started >= 0.01
    assert len(server.requests) == 2


async def test_the_async_client_really_sleeps() -> None:
    server = Server(unavailable("0.01"), ok(RESULT))
    async with mc.AsyncClient(BASE, transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        assert await client.push_gradients("m", GRADS) == {"w": 1}
        assert time.monotonic() - started >= 0.01
    assert len(server.requests) == 2


# -- against the real app --------------------------------------------------------------------------


class Losing:
    """Forwards requests to the app, but loses the responses of the first ``lose`` steps: the
    server acted, the client sees a read timeout (the case exactly-once retries exist for)."""

    def __init__(self, lose: int) -> None:
        self.lose = lose
        self.sent: list[httpx.Request] = []

    def lost(self, request: httpx.Request) -> bool:
        self.sent.append(request)
        if request.url.path.endswith("/step") and self.lose > 0:
            self.lose -= 1
            return True
        return False


class LosingAsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, app: Any, losing: Losing) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.losing = losing

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if self.losing.lost(request):
            raise httpx.ReadTimeout("response lost", request=request)
        return response


AppConnect = Callable[..., tuple[Api, Losing]]


@pytest.fixture(params=["sync", "async"])
def app_connect(request: pytest.FixtureRequest) -> Iterator[AppConnect]:
    """``app_connect(settings=None, lose=0, **client_kwargs)`` -> (api, losing) on a fresh in-process app."""
    closers: list[Callable[[], Any]] = []

    def make(settings: Settings | None = None, lose: int = 0, **kwargs: Any) -> tuple[Api, Losing]:
        app = create_app(settings or Settings(), journal=MemoryJournal())
        losing = Losing(lose)
        client: mc.Client | mc.AsyncClient
        if request.param == "sync":
            test_client = TestClient(app)
            test_client.__enter__()
            closers.append(lambda: test_client.__exit__(None, None, None))

            def forward(req: httpx.Request) -> httpx.Response:
                reply = test_client.request(req.method, str(req.url), headers=req.headers, content=req.content)
                if losing.lost(req):
                    raise httpx.ReadTimeout("response lost", request=req)
                return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

            client = mc.Client("http://testserver", transport=httpx.MockTransport(forward), **kwargs)
            client._sleep = lambda seconds: None
        else:
            client = mc.AsyncClient("http://testserver", transport=LosingAsyncTransport(app, losing), **kwargs)

            async def no_sleep(seconds: float) -> None:
                await asyncio.sleep(0)

            client._sleep = no_sleep
        return Api(client), losing

    yield make
    for close in closers:
        close()


async def test_a_lost_response_is_retried_and_applied_once(app_connect: AppConnect) -> None:
    api, losing = app_connect(lose=2)
    await api("create_model", "m", lr=0.5)
    await api("init_params", "m", {"w": np.zeros(2, np.float32)})
    results = await api("step_results", "m", {"w": np.ones(2, np.float32)})
    assert (results["w"].step, results["w"].replayed, results["w"].current_step) == (1, True, None)
    np.testing.assert_array_equal(results["w"].value, np.full(2, -0.5, np.float32))
    steps = [r for r in losing.sent if r.url.path.endswith("/step")]
    assert len(steps) == 3
    assert len({r.headers["idempotency-key"] for r in steps}) == 1
    state = await api("get_param_state", "m", "w")
    assert state.step == 1  # three attempts reached the server, one step was applied
    # the same key again later: the first result, flagged as replayed, with the current step
    await api("push_gradients", "m", {"w": np.ones(2, np.float32)})
    key = steps[0].headers["idempotency-key"]
    again = await api("step_results", "m", {"w": np.ones(2, np.float32)}, idempotency_key=key)
    assert (again["w"].step, again["w"].current_step, again["w"].replayed) == (1, 2, True)
    with pytest.raises(mc.InvalidRequest) as reused:
        await api("step", "m", {"w": np.zeros(2, np.float32)}, idempotency_key=key)
    assert reused.value.code == "idempotency-key-reused"


async def test_expected_steps_and_bounded_mode_through_the_app(app_connect: AppConnect) -> None:
    api, _ = app_connect()
    info = await api("create_model", "m", lr=0.1, mode="bounded", max_staleness=1)
    assert (info.mode, info.workers, info.max_staleness) == ("bounded", None, 1)
    await api("init_params", "m", {"w": np.zeros(2, np.float32)})
    assert await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, base_step=0) == {"w": 1}
    assert await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, base_step=0) == {"w": 2}
    with pytest.raises(mc.Conflict) as stale:
        await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, base_step=0)
    assert (stale.value.code, stale.value.current_steps) == ("stale-gradient", {"w": 2})
    info = await api("update_model", "m", mode="async")
    assert (info.mode, info.max_staleness) == ("async", None)
    with pytest.raises(mc.Conflict) as mismatch:
        await api("step", "m", {"w": np.ones(2, np.float32)}, expected_steps={"w": 1})
    assert (mismatch.value.code, mismatch.value.current_steps) == ("step-mismatch", {"w": 2})
    assert await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, expected_steps={"w": 2}) == {"w": 3}


async def test_a_lone_sync_worker_times_out_and_can_wait_again(app_connect: AppConnect) -> None:
    api, _ = app_connect(Settings(sync_timeout_s=0.02), sync_wait=0.05)
    info = await api("create_model", "m", lr=0.1, mode="sync", workers=2)
    assert (info.mode, info.workers) == ("sync", 2)
    await api("init_params", "m", {"w": np.zeros(2, np.float32)})
    with pytest.raises(mc.StepTimeout) as info_timeout:
        await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, worker_id=0, base_step=0)
    assert (info_timeout.value.base_step, info_timeout.value.workers) == (0, 2)
    assert info_timeout.value.contributions == {"w": 1}
    with pytest.raises(mc.InvalidRequest) as missing:
        await api("push_gradients", "m", {"w": np.ones(2, np.float32)}, base_step=0)
    assert missing.value.code == "mode-field-required"


async def test_sync_workers_wait_for_each_other() -> None:
    app = create_app(Settings(sync_timeout_s=0.05), journal=MemoryJournal())
    transport = httpx.ASGITransport(app=app)
    async with mc.AsyncClient("http://test", transport=transport, sync_wait=30, wire="json") as client:
        await client.create_model("m", lr=1.0, mode="sync", workers=2)
        await client.init_params("m", {"w": np.zeros(2, np.float32)})
        requests: list[httpx.Request] = []
        seen = transport.handle_async_request

        async def spy(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            return await seen(request)

        transport.handle_async_request = spy  # type: ignore[method-assign]

        async def worker(k: int, delay: float) -> dict[str, mc.StepResult]:
            await asyncio.sleep(delay)
            grad = np.full(2, float(k + 1), np.float32)
            return await client.step_results("m", {"w": grad}, worker_id=k, base_step=0)

        first, second = await asyncio.gather(worker(0, 0.0), worker(1, 0.3))
    for result in (first, second):
        assert result["w"].step == 1
        np.testing.assert_array_equal(result["w"].value, np.full(2, -1.5, np.float32))  # mean of 1 and 2
    worker0 = [r for r in requests if body_of(r)["worker_id"] == 0]
    assert len(worker0) >= 3  # 202s, re-sent until the other worker arrived
    assert len({r.headers["idempotency-key"] for r in worker0}) == 1
    assert len({r.content for r in worker0}) == 1
