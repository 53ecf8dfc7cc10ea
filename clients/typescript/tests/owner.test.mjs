// followOwner: a model's requests go to the replica that owns it, learnt from `Momentum-Owner`.
// With a scripted fetch (what goes where, and when the client goes back to the base URL), and with
// two real replicas on a real Redis, the one first asked paused with SIGSTOP.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import * as mc from "../dist/index.js";
import { scripted, startRedis, startServer } from "./helpers.mjs";

/** Step answers from a scripted fetch: each 200 is a step's answer at the next step, with `headers`. */
function answers() {
  let step = 0;
  return (status, headers = {}) =>
    () => {
      if (status !== 200) {
        const problem = { type: "urn:momentum-service:problem:owner-unreachable", title: "x", status };
        return new Response(JSON.stringify(problem), { status, headers: { "content-type": "application/problem+json", ...headers } });
      }
      step += 1;
      const body = `{"params":{"w":{"shape":[2],"dtype":"float32","step":${step},"lr":0.1}}}`;
      return new Response(body, { status: 200, headers: { "content-type": "application/json", ...headers } });
    };
}

const fails = () => () => Promise.reject(new TypeError("fetch failed"));
const urls = (seen) => seen.map((s) => String(s.url));

const grads = { w: mc.float32([1, 2]) };
const opts = (fetch, followOwner) => ({ fetch, followOwner, wire: "json", random: () => 0, apiKey: "k-1" });

test("followOwner: the owner named by a forwarded answer gets that model's next requests, other models stay on the base URL", async () => {
  const answer = answers();
  const { fetch, seen } = scripted([
    answer(200, { "momentum-owner": "http://r2:8000/" }),
    answer(200),
    answer(200),
    answer(200),
  ]);
  const c = new mc.Client("http://lb.invalid:8000", opts(fetch, true));
  await c.pushGradients("a", grads);
  await c.pushGradients("a", grads);
  await c.pushGradients("b", grads);
  await c.getParams("a").catch(() => {}); // (the scripted answer is a step's, not params': only the URL matters)
  assert.deepEqual(urls(seen), [
    "http://lb.invalid:8000/v1/models/a/step",
    "http://r2:8000/v1/models/a/step",
    "http://lb.invalid:8000/v1/models/b/step",
    "http://r2:8000/v1/models/a/params",
  ]);
});

test("followOwner: an owner that does not answer, or answers 503, is forgotten and the retry goes to the base URL", async () => {
  const answer = answers();
  const { fetch, seen } = scripted([
    answer(200, { "momentum-owner": "http://r2:8000" }),
    fails(), // r2 gives no answer
    answer(200, { "momentum-owner": "http://r3:8000" }), // the base URL forwards to the new owner
    answer(503, { "retry-after": "0" }), // r3 is not serving it
    answer(200),
  ]);
  const c = new mc.Client("http://lb.invalid:8000", opts(fetch, true));
  await c.pushGradients("a", grads);
  await c.pushGradients("a", grads);
  await c.pushGradients("a", grads);
  assert.deepEqual(urls(seen), [
    "http://lb.invalid:8000/v1/models/a/step",
    "http://r2:8000/v1/models/a/step",
    "http://lb.invalid:8000/v1/models/a/step",
    "http://r3:8000/v1/models/a/step",
    "http://lb.invalid:8000/v1/models/a/step",
  ]);
});

test("followOwner: a Momentum-Owner that is not a base URL is ignored; off (the default), the base URL always", async () => {
  for (const bad of ["ftp://r3", "http://r3/x", "http://r3?q", "not a url", "http://u:p@r3"]) {
    const answer = answers();
    const { fetch, seen } = scripted([answer(200, { "momentum-owner": bad }), answer(200)]);
    const c = new mc.Client("http://lb.invalid:8000", opts(fetch, true));
    await c.pushGradients("a", grads);
    await c.pushGradients("a", grads);
    assert.equal(urls(seen)[1], "http://lb.invalid:8000/v1/models/a/step", bad);
  }
  const answer = answers();
  const { fetch, seen } = scripted([answer(200, { "momentum-owner": "http://r2:8000" }), answer(200)]);
  const c = new mc.Client("http://lb.invalid:8000", opts(fetch, undefined));
  await c.pushGradients("a", grads);
  await c.pushGradients("a", grads);
  assert.deepEqual(urls(seen), ["http://lb.invalid:8000/v1/models/a/step", "http://lb.invalid:8000/v1/models/a/step"]);
});

// Two replicas on one Redis: a model owned by the second, asked through the first.
let redis;
let servers = [];
let model;

before(async () => {
  redis = await startRedis();
  const env = { MOMENTUM_LEASE_MS: "1000" };
  servers = [await startServer({ redisUrl: redis.url, env }), await startServer({ redisUrl: redis.url, env })];
  const admin = new mc.Client(servers[1].url);
  for (let i = 0; i < 20; i++) {
    const name = `f${i}`;
    await admin.createModel(name, { lr: 0.1, momentum: 0.9 });
    await admin.initParams(name, { w: mc.float32([0, 0, 0, 0]) });
    const res = await fetch(`${servers[0].url}/v1/models/${name}`);
    await res.arrayBuffer();
    if (res.headers.get("momentum-owner") === servers[1].url) {
      model = name;
      break;
    }
  }
  assert.ok(model, "every model went to the first replica");
});
after(async () => {
  for (const s of servers) {
    s.child.kill("SIGCONT");
    await s.stop("SIGKILL");
  }
  await redis?.stop();
});

for (const followOwner of [true, false]) {
  test(`real replicas, followOwner ${followOwner}: with the replica first asked paused, steps ${followOwner ? "go on at the owner" : "time out (negative control)"}`, async () => {
    const c = new mc.Client(servers[0].url, { followOwner, timeout: 2, maxRetries: 1 });
    const ones = { w: mc.float32([1, 1, 1, 1]) };
    const first = (await c.pushGradients(model, ones)).w; // forwarded by the first replica, which names the owner
    servers[0].child.kill("SIGSTOP");
    try {
      if (followOwner) {
        const steps = [];
        for (let i = 0; i < 3; i++) steps.push((await c.pushGradients(model, ones)).w);
        assert.deepEqual(steps, [first + 1, first + 2, first + 3]);
      } else {
        await assert.rejects(c.pushGradients(model, ones), mc.TransportError);
      }
    } finally {
      servers[0].child.kill("SIGCONT");
    }
  });
}
