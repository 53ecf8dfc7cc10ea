// Hostile bodies (tests/vectors/hostile.json, recorded from the server by hostile.py): a real server answers
// each as recorded, this client makes the same error class of it as the Python SDK, and nothing changes.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import * as mc from "../dist/index.js";
import { startServer, vectors } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer();
  const json = { "Content-Type": "application/json" };
  let r = await fetch(`${server.url}/v1/models/m`, {
    method: "PUT",
    headers: json,
    body: JSON.stringify({ optimizer: { lr: 0.1, momentum: 0.9 } }),
  });
  assert.equal(r.status, 201);
  r = await fetch(`${server.url}/v1/models/m/params/w`, {
    method: "PUT",
    headers: json,
    body: JSON.stringify({ shape: [2, 2], dtype: "float32", data: [1, 1, 1, 1] }),
  });
  assert.equal(r.status, 201);
});
after(async () => server?.stop());

for (const v of vectors("hostile")) {
  test(`hostile ${v.name}: ${v.status} ${v.code}, ${v.class}`, async () => {
    const r = await fetch(`${server.url}${v.path}`, {
      method: v.method,
      headers: { "Content-Type": v.content_type },
      body: Buffer.from(v.body, "base64"),
    });
    assert.equal(r.status, v.status);
    assert.equal(r.headers.get("content-type"), "application/problem+json");
    const problem = await r.json();
    assert.equal(problem.type, `${mc.PROBLEM_TYPE_PREFIX}${v.code}`);
    const error = mc.apiError(r.status, problem, { headers: r.headers });
    assert.equal(error.constructor.name, v.class);
    assert.equal(error.code, v.code);
  });
}

test("no hostile body changed the parameter", async () => {
  const r = await fetch(`${server.url}/v1/models/m/params/w`);
  assert.equal((await r.json()).step, 0);
});
