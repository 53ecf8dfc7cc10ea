// Retries of steps, with a scripted fetch: what is re-sent, when, and what is given up.
import assert from "node:assert/strict";
import { test } from "node:test";
import * as mc from "../dist/index.js";
import { scripted } from "./helpers.mjs";

const P = "urn:momentum-service:problem:";
const OK = { params: { w: { shape: [2], dtype: "float32", data: [0.5, -0], step: 1, lr: 0.1 } } };
const grads = { w: mc.float32([1, 2]) };

function problem(status, slug, headers = {}) {
  return new Response(JSON.stringify({ type: P + slug, title: "x", status }), {
    status,
    headers: { "content-type": "application/problem+json", ...headers },
  });
}

function ok(body = OK, headers = {}) {
  const text = body === OK ? '{"params":{"w":{"shape":[2],"dtype":"float32","data":[0.5,-0.0],"step":1,"lr":0.1}}}' : JSON.stringify(body);
  return new Response(text, { status: 200, headers: { "content-type": "application/json", ...headers } });
}

function client(fetch, options = {}) {
  return new mc.Client("http://server.invalid", { fetch, random: () => 0, apiKey: "k-1", ...options });
}

for (const wire of ["safetensors", "json"]) {
  test(`${wire}: 503, no answer, 409 in flight and 502/504 are retried with the same bytes and key`, async () => {
    const { fetch, seen } = scripted([
      () => problem(503, "store-unavailable", { "retry-after": "0" }),
      () => Promise.reject(new TypeError("fetch failed", { cause: { code: "ECONNRESET" } })),
      () => problem(409, "idempotency-in-flight", { "retry-after": "0" }),
      () => new Response("bad gateway", { status: 502 }),
      () => new Response("", { status: 504 }),
      () => ok(),
    ]);
    const out = await client(fetch, { wire }).step("m", grads);
    assert.equal(seen.length, 6);
    assert.deepEqual([...out.w.data], [0.5, -0]);
    assert.ok(Object.is(out.w.data[1], -0));
    const key = seen[0].headers["Idempotency-Key"];
    assert.match(key, /^[0-9a-f]{32}$/);
    assert.equal(seen[0].headers["Momentum-Fresh-Key"], "1");
    for (const s of seen.slice(1)) {
      assert.equal(s.headers["Idempotency-Key"], key);
      assert.equal(s.headers["Momentum-Fresh-Key"], undefined);
      assert.equal(s.body, seen[0].body);
      assert.equal(s.headers.Authorization, "Bearer k-1");
    }
  });
}

test("a fresh key per step; a given idempotencyKey is sent as is", async () => {
  let step = 0;
  const next = () => ok({ params: { w: { shape: [2], dtype: "float32", data: [1, 2], step: ++step, lr: 0.1 } } });
  const { fetch, seen } = scripted([next, next, next]);
  const c = client(fetch);
  await c.step("m", grads);
  await c.step("m", grads);
  await c.step("m", grads, { idempotencyKey: "my-key-1" });
  assert.notEqual(seen[0].headers["Idempotency-Key"], seen[1].headers["Idempotency-Key"]);
  assert.equal(seen[2].headers["Idempotency-Key"], "my-key-1");
  assert.equal(seen[2].headers["Momentum-Fresh-Key"], undefined);
  await assert.rejects(c.step("m", grads, { idempotencyKey: "has space" }), RangeError);
});

test("maxRetries: the last transient answer is thrown once the retries are used up", async () => {
  const { fetch, seen } = scripted([() => problem(503, "store-unavailable", { "retry-after": "0" })]);
  await assert.rejects(client(fetch, { maxRetries: 3 }).pushGradients("m", grads), (e) => {
    assert.ok(e instanceof mc.ServiceUnavailable && e instanceof mc.ServerError);
    assert.equal(e.code, "store-unavailable");
    assert.equal(e.retryAfter, 0);
    return true;
  });
  assert.equal(seen.length, 4);
  const t = scripted([() => Promise.reject(new TypeError("fetch failed"))]);
  await assert.rejects(client(t.fetch, { maxRetries: 0 }).step("m", grads), mc.TransportError);
  assert.equal(t.seen.length, 1);
});

test("4xx answers are not retried: a step-mismatch is a Conflict with currentSteps", async () => {
  const { fetch, seen } = scripted([
    () =>
      new Response(JSON.stringify({ type: P + "step-mismatch", status: 409, title: "Conflict", current_steps: { w: 7 } }), {
        status: 409,
        headers: { "content-type": "application/problem+json" },
      }),
  ]);
  await assert.rejects(client(fetch).step("m", grads, { expectedSteps: { w: 3 } }), (e) => {
    assert.ok(e instanceof mc.Conflict);
    assert.equal(e.code, "step-mismatch");
    assert.deepEqual(e.currentSteps, { w: 7 });
    return true;
  });
  assert.equal(seen.length, 1);
});

test("backoff: full jitter, 50 ms doubling; Retry-After is honoured (capped at 2 s)", async () => {
  const { fetch, seen } = scripted([
    () => new Response("", { status: 503 }),
    () => new Response("", { status: 503 }),
    () => new Response("", { status: 503 }),
    () => problem(503, "overloaded", { "retry-after": "0.3" }),
    () => ok(),
  ]);
  await client(fetch, { random: () => 0.999 }).step("m", grads);
  const gaps = seen.slice(1).map((s, i) => s.at - seen[i].at);
  // lower bounds are exact (timers never fire early); the upper ones leave room for a loaded machine
  assert.ok(gaps[0] >= 45 && gaps[0] < 1000, `${gaps}`);
  assert.ok(gaps[1] >= 95 && gaps[1] < 1000, `${gaps}`);
  assert.ok(gaps[2] >= 195 && gaps[2] < 1000, `${gaps}`);
  assert.ok(gaps[3] >= 295 && gaps[3] < 1200, `${gaps}`);
  assert.ok(gaps[0] < gaps[1] && gaps[1] < gaps[2], `${gaps}`);
});

test("sync: a 202 is re-sent (same key and bytes) until the step completes, or StepTimeout after syncWait", async () => {
  const pending = () =>
    new Response(JSON.stringify({ status: "pending", base_step: 4, workers: 2, contributions: { w: 1 } }), {
      status: 202,
      headers: { "content-type": "application/json", "retry-after": "0" },
    });
  const a = scripted([pending, pending, () => ok()]);
  const res = await client(a.fetch).stepResults("m", grads, { workerId: 1, baseStep: 4 });
  assert.equal(res.w.step, 1);
  assert.equal(a.seen.length, 3);
  assert.equal(new Set(a.seen.map((s) => s.headers["Idempotency-Key"] + s.body)).size, 1);
  const b = scripted([() => new Promise((r) => setTimeout(() => r(pending()), 30))]);
  await assert.rejects(client(b.fetch, { syncWait: 0.2 }).step("m", grads, { workerId: 0, baseStep: 4 }), (e) => {
    assert.ok(e instanceof mc.StepTimeout);
    assert.equal(e.baseStep, 4);
    assert.equal(e.workers, 2);
    assert.deepEqual(e.contributions, { w: 1 });
    return true;
  });
  assert.ok(b.seen.length >= 3);
});

test("timeout is a RequestTimeout (retried for steps); the caller's AbortSignal aborts without retrying", async () => {
  // AbortSignal.timeout's timer does not keep the process alive: this one does, until the abort
  const hang = (init) =>
    new Promise((_, reject) => {
      const alive = setInterval(() => {}, 1000);
      init.signal.addEventListener("abort", () => {
        clearInterval(alive);
        reject(init.signal.reason);
      });
    });
  const a = scripted([hang]);
  await assert.rejects(client(a.fetch, { timeout: 0.05, maxRetries: 2 }).step("m", grads), (e) => {
    assert.ok(e instanceof mc.RequestTimeout && e instanceof mc.TransportError);
    return true;
  });
  assert.equal(a.seen.length, 3);
  const b = scripted([hang]);
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 50);
  await assert.rejects(client(b.fetch, { timeout: 5 }).step("m", grads, { signal: controller.signal }), (e) => {
    assert.equal(e.name, "AbortError");
    return true;
  });
  assert.equal(b.seen.length, 1);
});

test("a replay is marked replayed, with current_step", async () => {
  const body = { params: { w: { shape: [2], dtype: "float32", data: [1, 2], step: 3, lr: 0.1, current_step: 5 } } };
  const { fetch } = scripted([() => ok(body, { "idempotent-replayed": "true" })]);
  const r = await client(fetch, { wire: "json" }).stepResults("m", grads, { idempotencyKey: "k" });
  assert.equal(r.w.replayed, true);
  assert.equal(r.w.currentStep, 5);
  assert.equal(r.w.staleness, null);
});

test("arguments are checked before sending", async () => {
  const { fetch, seen } = scripted([() => ok()]);
  const c = client(fetch);
  await assert.rejects(c.step("m", { w: { data: [1, 2], shape: [2], dtype: "float32" } }), TypeError);
  await assert.rejects(c.step("m", { w: { data: new Float32Array(3), shape: [2], dtype: "float32" } }), RangeError);
  await assert.rejects(c.step("m", { w: mc.float32([NaN, 1]) }), RangeError);
  await assert.rejects(c.initParams("m", { w: { data: new Uint16Array(2), shape: [2], dtype: "bfloat16" } }), TypeError);
  await assert.rejects(c.step("m", grads, { metrics: { loss: Infinity } }), RangeError);
  assert.throws(() => new mc.Client("ftp://x"), TypeError);
  assert.throws(() => new mc.Client("http://x", { wire: "xml" }), RangeError);
  assert.equal(seen.length, 0);
});

test("MOMENTUM_API_KEY is the default key", async () => {
  process.env.MOMENTUM_API_KEY = "env-key";
  try {
    const { fetch, seen } = scripted([() => ok({ models: [], next: null })]);
    await new mc.Client("http://x", { fetch }).listModels();
    assert.equal(seen[0].headers.Authorization, "Bearer env-key");
  } finally {
    delete process.env.MOMENTUM_API_KEY;
  }
});

test("a GET without an answer is sent once more (a kept-alive connection closed while idle); other calls are not", async () => {
  const closed = () => Promise.reject(new TypeError("fetch failed", { cause: { code: "UND_ERR_SOCKET" } }));
  const a = scripted([closed, () => ok({ name: "m", optimizer: { rule: "pytorch", lr: 0.1 }, params: {} })]);
  assert.equal((await client(a.fetch).getModel("m")).name, "m");
  assert.equal(a.seen.length, 2);
  const b = scripted([closed]);
  await assert.rejects(client(b.fetch).getModel("m"), mc.TransportError);
  assert.equal(b.seen.length, 2);
  const c = scripted([closed]);
  await assert.rejects(client(c.fetch).deleteModel("m"), mc.TransportError);
  assert.equal(c.seen.length, 1);
});
