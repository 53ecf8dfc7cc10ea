// Exactly-once steps on Redis: the server SIGKILLed mid-request (then restarted on the same port), and a
// Redis frozen past the client's timeout; each push is retried with the same key and applied once.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import * as mc from "../dist/index.js";
import { startRedis, startServer } from "./helpers.mjs";

const ENV = { MOMENTUM_LEASE_MS: "1000", MOMENTUM_REDIS_TIMEOUT_S: "0.5" };
let redis;
let server;

before(async () => {
  redis = await startRedis();
  server = await startServer({ redisUrl: redis.url, env: ENV });
});
after(async () => {
  await server?.stop("SIGKILL");
  await redis?.stop();
});

/** fetch, counting the step attempts and those that got no answer. */
function counting() {
  const counts = { steps: 0, failed: 0, statuses: [] };
  const f = async (url, init) => {
    const isStep = String(url).endsWith("/step");
    if (isStep) counts.steps += 1;
    try {
      const res = await fetch(url, init);
      if (isStep) counts.statuses.push(res.status);
      return res;
    } catch (e) {
      if (isStep) counts.failed += 1;
      throw e;
    }
  };
  return { fetch: f, counts };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A one-hot gradient for push `i` of `n`: with lr 1 and no momentum, value[i] = -1 once per application. */
function oneHot(i, n) {
  const g = new Float32Array(n);
  g[i] = 1;
  return { data: g, shape: [n], dtype: "float32" };
}

test("server SIGKILLed mid-request and restarted on the same port: the retried push is applied exactly once", async () => {
  const { fetch, counts } = counting();
  const c = new mc.Client(server.url, { timeout: 30, maxRetries: 60, fetch });
  await c.createModel("killed", { lr: 1 });
  await c.initParams("killed", { w: mc.float32([0, 0, 0, 0]) });
  assert.deepEqual(await c.pushGradients("killed", { w: oneHot(0, 4) }), { w: 1 });

  redis.child.kill("SIGSTOP"); // the step's commit waits in Redis...
  const push = c.stepResults("killed", { w: oneHot(1, 4) });
  await sleep(400);
  await server.stop("SIGKILL"); // ...while its server dies: the client hears nothing
  redis.child.kill("SIGCONT");
  server = await startServer({ port: server.port, redisUrl: redis.url, env: ENV });
  const r = await push;
  assert.equal(r.w.step, 2);
  assert.ok(counts.failed >= 1 && counts.steps >= 3, JSON.stringify(counts)); // the first attempt got no answer

  const state = await c.getParamState("killed", "w");
  assert.equal(state.step, 2);
  assert.deepEqual([...state.value.data], [-1, -1, 0, 0]);
  assert.deepEqual(await c.pushGradients("killed", { w: oneHot(2, 4) }), { w: 3 });
});

test("Redis frozen past the client's timeout: the push is retried with the same key and applied once", async () => {
  const { fetch, counts } = counting();
  const c = new mc.Client(server.url, { timeout: 0.3, maxRetries: 40, fetch });
  await c.createModel("frozen", { lr: 1 });
  await c.initParams("frozen", { w: mc.float32([0, 0, 0]) });
  for (const [i, freezeMs] of [[0, 600], [1, 2400]]) {
    redis.child.kill("SIGSTOP");
    const push = c.pushGradients("frozen", { w: oneHot(i, 3) });
    await sleep(freezeMs);
    redis.child.kill("SIGCONT");
    assert.deepEqual(await push, { w: i + 1 });
  }
  assert.ok(counts.failed >= 2, JSON.stringify(counts)); // the client timed out and retried
  const patient = new mc.Client(server.url, { timeout: 10 });
  const state = await patient.getParamState("frozen", "w");
  assert.equal(state.step, 2);
  assert.deepEqual([...state.value.data], [-1, -1, 0]);
});

test("Redis frozen longer than the server's Redis timeout: 503s, retried with the same key, then applied once", async () => {
  const { fetch, counts } = counting();
  const c = new mc.Client(server.url, { timeout: 30, maxRetries: 40, fetch });
  await c.createModel("frozen-503", { lr: 1 });
  await c.initParams("frozen-503", { w: mc.float32([0, 0]) });
  redis.child.kill("SIGSTOP");
  const push = c.stepResults("frozen-503", { w: oneHot(0, 2) });
  await sleep(3000);
  redis.child.kill("SIGCONT");
  const r = await push;
  assert.equal(r.w.step, 1);
  assert.ok(counts.statuses.includes(503), JSON.stringify(counts)); // the server said so, and the client retried
  const state = await c.getParamState("frozen-503", "w");
  assert.equal(state.step, 1);
  assert.deepEqual([...state.value.data], [-1, 0]);
});
