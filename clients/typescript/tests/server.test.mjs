// Every operation against a real momentum-service process (embedded store), in both wires.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import * as mc from "../dist/index.js";
import { fromHex, hexOf, sameBits, startServer, VENV, vectors } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer({ env: { MOMENTUM_SYNC_TIMEOUT_S: "0.3" } });
});
after(async () => {
  await server?.stop();
});

test("health and ready; a server that is not there is not healthy", async () => {
  const c = new mc.Client(server.url);
  assert.equal(await c.health(), true);
  assert.equal(await c.ready(), true);
  const gone = new mc.Client("http://127.0.0.1:9", { timeout: 2 });
  assert.equal(await gone.health(), false);
  await assert.rejects(gone.getModel("m"), mc.TransportError);
});

for (const wire of ["safetensors", "json"]) {
  describe(`${wire} wire`, () => {
    const m = `ts-${wire}`;
    let c;
    before(() => {
      c = new mc.Client(server.url, { wire });
    });

    test("createModel only creates: ModelExists with the existing config, or the existing model with existOk", async () => {
      const info = await c.createModel(m, { lr: 0.1, momentum: 0.9, nesterov: true });
      assert.equal(info.name, m);
      assert.equal(info.optimizer.rule, "pytorch");
      assert.equal(info.optimizer.nesterov, true);
      await assert.rejects(c.createModel(m, { lr: 0.5 }), (e) => {
        assert.ok(e instanceof mc.ModelExists && e instanceof mc.PreconditionFailed && e instanceof mc.Conflict);
        assert.equal(e.code, "model-exists");
        assert.equal(e.existingConfig.optimizer.lr, 0.1);
        return true;
      });
      const warnings = [];
      const onWarning = (w) => warnings.push(w);
      process.on("warning", onWarning);
      const same = await c.createModel(m, { lr: 0.5, existOk: true });
      assert.equal(same.optimizer.lr, 0.1);
      await c.createModel(m, { lr: 0.1, momentum: 0.9, nesterov: true, existOk: true }); // the same config: no warning
      await new Promise((r) => setImmediate(r));
      process.off("warning", onWarning);
      assert.equal(warnings.length, 1, String(warnings));
      assert.equal(warnings[0].name, "ModelConfigWarning");
      assert.match(warnings[0].message, /optimizer\.lr: asked 0\.5, the model has 0\.1/);
      assert.match(warnings[0].message, /optimizer\.momentum: asked 0, the model has 0\.9/);
      assert.match(warnings[0].message, /optimizer\.nesterov: asked false \(the default\), the model has true/);
    });

    test("initParams, existOk never overwrites; getParams and getParamState give back the exact bits", async () => {
      const edges = fromHex(vectors("tensors").find((t) => t.name === "f32-edges"));
      const w = mc.float32([0.1, 0.2, 0.3, 0.4], [2, 2]);
      const s = fromHex(vectors("tensors").find((t) => t.name === "f64-scalar"));
      assert.deepEqual(await c.initParams(m, { w, edges, s }), { w: true, edges: true, s: true });
      const again = await c.initParams(m, { w: mc.float32([9, 9, 9, 9], [2, 2]), b: mc.float32([0.5]) }, { existOk: true });
      assert.deepEqual(again, { w: false, b: true });
      const got = await c.getParams(m);
      assert.deepEqual(Object.keys(got).sort(), ["b", "edges", "s", "w"]);
      assert.ok(sameBits(got.w, w));
      assert.ok(sameBits(got.edges, edges), hexOf(got.edges));
      assert.ok(sameBits(got.s, s));
      assert.deepEqual(got.s.shape, []);
      const some = await c.getParams(m, ["w", "b"]);
      assert.deepEqual(Object.keys(some).sort(), ["b", "w"]);
      const state = await c.getParamState(m, "w");
      assert.equal(state.step, 0);
      assert.equal(state.velocity, null);
      assert.ok(sameBits(state.value, w));
    });

    test("step, stepResults and pushGradients: steps, lr, staleness, velocity, metrics, bf16/f16 gradients", async () => {
      const g = mc.float32([1, -1, 0.5, 0], [2, 2]);
      const v1 = await c.step(m, { w: g });
      assert.deepEqual(v1.w.shape, [2, 2]);
      assert.equal(v1.w.dtype, "float32");
      const r = await c.stepResults(m, { w: g }, { baseStep: 1, expectedSteps: { w: 1 }, metrics: { loss: 0.31 } });
      assert.equal(r.w.step, 2);
      assert.equal(r.w.lr, 0.1);
      assert.equal(r.w.staleness, 0);
      assert.equal(r.w.replayed, false);
      assert.ok(r.w.value instanceof Object);
      const series = await (await fetch(`${server.url}/v1/models/${m}/metrics`)).json();
      assert.ok(JSON.stringify(series.points).includes("0.31"), JSON.stringify(series)); // the metrics were kept
      const steps = await c.pushGradients(m, { w: g, b: mc.float32([0.25]) });
      assert.deepEqual(steps, { w: 3, b: 1 });
      const noValues = await c.stepResults(m, { b: mc.float32([1]) }, { returnParams: false });
      assert.equal(noValues.b.value, null);
      assert.equal(noValues.b.step, 2);
      const state = await c.getParamState(m, "w");
      assert.equal(state.step, 3);
      assert.ok(state.velocity !== null);
      assert.ok(state.state.velocity !== undefined);
      if (wire === "safetensors") {
        const h = { data: mc.toBfloat16Bits([1, -1, 0.5, 0]), shape: [2, 2], dtype: "bfloat16" };
        const f = { data: new Uint16Array([0x3c00, 0xbc00, 0x3800, 0x0000]), shape: [2, 2], dtype: "float16" };
        assert.equal((await c.stepResults(m, { w: h })).w.step, 4);
        assert.equal((await c.stepResults(m, { w: f })).w.step, 5);
      } else {
        const h = { data: mc.toBfloat16Bits([1, -1, 0.5, 0]), shape: [2, 2], dtype: "bfloat16" };
        assert.equal((await c.stepResults(m, { w: h })).w.step, 4);
        assert.equal((await c.stepResults(m, { w: g })).w.step, 5);
      }
    });

    test("a key sent twice is applied once: the replay says so", async () => {
      const g = { b: mc.float32([1]) };
      const first = await c.stepResults(m, g, { idempotencyKey: `key-${wire}` });
      const second = await c.stepResults(m, g, { idempotencyKey: `key-${wire}` });
      assert.equal(second.b.step, first.b.step);
      assert.equal(second.b.replayed, true);
      assert.ok(sameBits(second.b.value, first.b.value));
      assert.equal((await c.getParamState(m, "b")).step, first.b.step);
      await assert.rejects(c.stepResults(m, { b: mc.float32([2]) }, { idempotencyKey: `key-${wire}` }), (e) => {
        assert.ok(e instanceof mc.InvalidRequest);
        assert.equal(e.code, "idempotency-key-reused");
        return true;
      });
    });

    test("errors: step-mismatch with currentSteps, tensor-mismatch, not found, invalid config", async () => {
      await assert.rejects(c.step(m, { w: mc.float32([1, 1, 1, 1], [2, 2]) }, { expectedSteps: { w: 1 } }), (e) => {
        assert.ok(e instanceof mc.Conflict && !(e instanceof mc.TensorMismatch));
        assert.equal(e.code, "step-mismatch");
        assert.deepEqual(e.currentSteps, { w: 5 });
        return true;
      });
      await assert.rejects(c.step(m, { w: mc.float64([1, 1, 1, 1], [2, 2]) }), (e) => {
        assert.ok(e instanceof mc.TensorMismatch);
        assert.equal(e.mismatches.w.expected.dtype, "float32");
        return true;
      });
      await assert.rejects(c.step(m, { nope: mc.float32([1]) }), (e) => e instanceof mc.NotFound && e.code === "param-not-found");
      await assert.rejects(c.getModel(`${m}-missing`), (e) => e instanceof mc.NotFound && e.code === "model-not-found");
      await assert.rejects(c.updateModel(m, { lr: -0.1 }), (e) => {
        assert.ok(e instanceof mc.InvalidRequest);
        assert.equal(e.code, "invalid-config");
        assert.deepEqual(e.errors[0].loc, ["body", "optimizer", "lr"]);
        return true;
      });
    });

    test("updateModel, replaceModel, getModel, listModels (paged)", async () => {
      const u = await c.updateModel(m, { lr: 0.01, weightDecay: 0.001 });
      assert.equal(u.optimizer.lr, 0.01);
      assert.equal(u.optimizer.weight_decay, 0.001);
      await assert.rejects(c.updateModel(m, {}), TypeError);
      await assert.rejects(c.updateModel(m, { weight_decay: 0.1 }), TypeError);
      await assert.rejects(c.createModel(`${m}-x`, { lr: 0.1, max_staleness: 2 }), TypeError);
      const g = await c.updateModel(m, { groups: [{ name: "biases", params: ["b"], weight_decay: 0 }] });
      assert.equal(g.groups[0].name, "biases");
      const r = await c.replaceModel(m, { lr: 0.05, momentum: 0.5, schedule: { type: "cosine", T_max: 100 } });
      assert.equal(r.optimizer.momentum, 0.5);
      assert.equal(r.schedule.type, "cosine");
      const info = await c.getModel(m);
      assert.equal(info.params.w.step, 5);
      assert.deepEqual(info.params.w.shape, [2, 2]);
      const all = await c.listModels({ pageSize: 1 });
      assert.ok(all.some((s) => s.name === m && s.rule === "pytorch" && s.params === 4));
    });

    test("saveCheckpoint and loadCheckpoint restore the model bitwise; deleteParam and deleteModel", async () => {
      const before = await c.getParams(m);
      const file = await c.saveCheckpoint(m);
      assert.ok(file instanceof Uint8Array && file.length > 8);
      const { metadata } = mc.decodeSafetensors(file);
      assert.equal(JSON.parse(JSON.stringify(metadata)).format, "momentum-checkpoint/1");
      await c.deleteModel(m);
      await assert.rejects(c.getModel(m), mc.NotFound);
      const restored = await c.loadCheckpoint(m, file, { replace: false });
      assert.equal(restored.params.w.step, 5);
      const after = await c.getParams(m);
      for (const n of Object.keys(before)) assert.ok(sameBits(after[n], before[n]), n);
      await assert.rejects(c.loadCheckpoint(m, file, { replace: false }), mc.ModelExists);
      await c.loadCheckpoint(m, file);
      await c.deleteParam(m, "edges");
      await assert.rejects(c.getParamState(m, "edges"), mc.NotFound);
      await c.deleteModel(m);
    });
  });
}

test("bitwise: the same pushes from this client and from the Python SDK give the same bits, both wires", async () => {
  const pushes = [];
  for (let i = 0; i < 20; i++) {
    pushes.push(Array.from({ length: 6 }, (_, j) => Math.sin(i * 7 + j * 3) * 10 ** ((j % 5) - 2)));
  }
  const init = [0.1, -0.2, 3e-39, -0, 1e30, 7];
  const config = { lr: 0.05, momentum: 0.9, nesterov: true, weightDecay: 0.01 };
  const ours = {};
  for (const wire of ["safetensors", "json"]) {
    const c = new mc.Client(server.url, { wire });
    const m = `bitwise-ts-${wire}`;
    await c.createModel(m, config);
    await c.initParams(m, { w: mc.float32(init, [2, 3]), d: mc.float64(init) });
    for (const p of pushes) await c.step(m, { w: mc.float32(p, [2, 3]), d: mc.float64(p) });
    const s = await c.getParamState(m, "w");
    const d = await c.getParamState(m, "d");
    ours[wire] = [hexOf(s.value), hexOf(s.velocity), hexOf(d.value), hexOf(d.velocity)];
  }
  const script = `
import json, sys
import numpy as np
import momentum_client as mc
url, pushes, init = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
c = mc.Client(url)
c.create_model("bitwise-py", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
c.init_params("bitwise-py", {"w": np.float32(init).reshape(2, 3), "d": np.float64(init)})
for p in pushes:
    c.step("bitwise-py", {"w": np.float32(p).reshape(2, 3), "d": np.float64(p)})
w, d = c.get_param_state("bitwise-py", "w"), c.get_param_state("bitwise-py", "d")
print(json.dumps([a.astype(a.dtype.newbyteorder("<")).tobytes().hex() for a in (w.value, w.velocity, d.value, d.velocity)]))
`;
  const out = execFileSync(path.join(VENV, "bin", "python"), ["-c", script, server.url, JSON.stringify(pushes), JSON.stringify(init)], {
    encoding: "utf8",
  });
  const python = JSON.parse(out);
  assert.deepEqual(ours.safetensors, python);
  assert.deepEqual(ours.json, python);
});

test("sync mode: a push waits for the other worker (202 re-sent), StepTimeout after syncWait", async () => {
  const c = new mc.Client(server.url, { syncWait: 0.1 });
  await c.createModel("ts-sync", { lr: 0.1, momentum: 0.9, mode: "sync", workers: 2 });
  await c.initParams("ts-sync", { w: mc.float32([1, 1]) });
  await assert.rejects(c.step("ts-sync", { w: mc.float32([0.1, 0.2]) }, { workerId: 1, baseStep: 0 }), (e) => {
    assert.ok(e instanceof mc.StepTimeout);
    assert.equal(e.baseStep, 0);
    assert.equal(e.workers, 2);
    assert.deepEqual(e.contributions, { w: 1 });
    return true;
  });
  const patient = new mc.Client(server.url, { syncWait: 30 });
  const one = patient.stepResults("ts-sync", { w: mc.float32([0.1, 0.2]) }, { workerId: 1, baseStep: 0 });
  await new Promise((r) => setTimeout(r, 500)); // at least one 202 and re-send
  const zero = await patient.stepResults("ts-sync", { w: mc.float32([0.3, 0.4]) }, { workerId: 0, baseStep: 0 });
  const r1 = await one;
  assert.deepEqual([...zero.w.value.data], [0.9800000190734863, 0.9699999690055847]);
  assert.ok(sameBits(r1.w.value, zero.w.value));
  assert.equal(r1.w.step, 1);
});

test("examples/worker.mjs trains a linear regression", async () => {
  const { execFile } = await import("node:child_process");
  const { promisify } = await import("node:util");
  const { fileURLToPath } = await import("node:url");
  const worker = fileURLToPath(new URL("../examples/worker.mjs", import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [worker, server.url, "150"], {
    env: { ...process.env, MODEL: "linreg-example" },
  });
  const last = stdout.trim().split("\n").at(-2);
  const loss = Number(last.match(/loss ([0-9.e-]+)/)[1]);
  assert.ok(loss < 0.01, stdout);
  const w = (await new mc.Client(server.url).getParams("linreg-example", ["w"])).w;
  [2, -3, 0.5, 1].forEach((t, j) => assert.ok(Math.abs(w.data[j] - t) < 0.05, stdout));
});

test("StepWentBack: a model re-created by another client; warn returns the result; a client's own deletes are no regression", async () => {
  const a = new mc.Client(server.url);
  const b = new mc.Client(server.url);
  await a.createModel("went-back", { lr: 0.1 });
  await a.initParams("went-back", { w: mc.float32([1, 2]) });
  await a.pushGradients("went-back", { w: mc.float32([1, 1]) });
  await a.pushGradients("went-back", { w: mc.float32([1, 1]) });
  await b.deleteModel("went-back");
  await b.createModel("went-back", { lr: 0.1 });
  await b.initParams("went-back", { w: mc.float32([1, 2]) });
  await assert.rejects(a.pushGradients("went-back", { w: mc.float32([1, 1]) }), (e) => {
    assert.ok(e instanceof mc.StepWentBack && e instanceof mc.MomentumError);
    assert.deepEqual(e.regressions, { w: [1, 2] });
    assert.equal(e.result.w.step, 1);
    return true;
  });
  assert.deepEqual(await a.pushGradients("went-back", { w: mc.float32([1, 1]) }), { w: 2 }); // seen again from 1
  const warn = new mc.Client(server.url, { onStepBack: "warn" });
  await warn.pushGradients("went-back", { w: mc.float32([1, 1]) });
  await b.deleteModel("went-back");
  await b.createModel("went-back", { lr: 0.1 });
  await b.initParams("went-back", { w: mc.float32([1, 2]) });
  const warnings = [];
  const onWarning = (w) => warnings.push(w);
  process.on("warning", onWarning);
  assert.deepEqual(await warn.pushGradients("went-back", { w: mc.float32([1, 1]) }), { w: 1 });
  await new Promise((r) => setImmediate(r));
  process.off("warning", onWarning);
  assert.ok(warnings.some((w) => w.name === "StepWentBackWarning"), String(warnings));
  // the client's own delete and re-create forget what it saw
  await a.deleteModel("went-back");
  await a.createModel("went-back", { lr: 0.1 });
  await a.initParams("went-back", { w: mc.float32([1, 2]) });
  assert.deepEqual(await a.pushGradients("went-back", { w: mc.float32([1, 1]) }), { w: 1 });
});

test("castGradients: a float64 gradient for a float32 parameter is cast (after one 409), else TensorMismatch", async () => {
  const c = new mc.Client(server.url, { castGradients: true, wire: "json" });
  await c.createModel("cast", { lr: 0.5 });
  await c.initParams("cast", { w: mc.float32([1, 2]), d: mc.float64([1, 2]) });
  const g = mc.float64([0.1, 0.3]);
  const r = await c.step("cast", { w: g, d: mc.float32([0.1, 0.3]) });
  assert.equal(r.w.dtype, "float32");
  assert.deepEqual([...r.w.data], [Math.fround(1 - 0.5 * Math.fround(0.1)), Math.fround(2 - 0.5 * Math.fround(0.3))]);
  assert.equal(r.d.dtype, "float64");
  assert.equal((await c.stepResults("cast", { w: g })).w.step, 2);
  const strict = new mc.Client(server.url);
  await assert.rejects(strict.step("cast", { w: g }), mc.TensorMismatch);
});
