// A linear-regression worker: the model's parameters and momentum live in momentum-service; this
// worker computes gradients on its own batches and pushes them.
//
//   node examples/worker.mjs [server URL] [steps]
//
// e.g. after `.venv/bin/momentum-service serve --port 8000`: node examples/worker.mjs http://127.0.0.1:8000 200
import { Client, float32 } from "momentum-client";

const url = process.argv[2] ?? process.env.MOMENTUM_URL ?? "http://127.0.0.1:8000";
const steps = Number(process.argv[3] ?? 200);
const model = process.env.MODEL ?? "linreg-ts";
const [FEATURES, BATCH] = [4, 32];
const TRUE_W = [2, -3, 0.5, 1];
const TRUE_B = 0.7;

// Deterministic data: y = x . TRUE_W + TRUE_B + noise.
let seed = 42;
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1;
function batch() {
  const x = Array.from({ length: BATCH }, () => Array.from({ length: FEATURES }, rand));
  const y = x.map((row) => row.reduce((s, v, j) => s + v * TRUE_W[j], TRUE_B) + 0.01 * rand());
  return { x, y };
}

const client = new Client(url);
await client.createModel(model, { lr: 0.05, momentum: 0.9, existOk: true });
await client.initParams(model, { w: float32(new Array(FEATURES).fill(0)), b: float32([0], []) }, { existOk: true });
let { w, b } = await client.getParams(model);

let loss = 0;
for (let step = 1; step <= steps; step++) {
  const { x, y } = batch();
  const gw = new Float32Array(FEATURES);
  let gb = 0;
  loss = 0;
  for (let i = 0; i < BATCH; i++) {
    const err = x[i].reduce((s, v, j) => s + v * w.data[j], b.data[0]) - y[i];
    loss += (err * err) / BATCH;
    for (let j = 0; j < FEATURES; j++) gw[j] += (2 * err * x[i][j]) / BATCH;
    gb += (2 * err) / BATCH;
  }
  // One step, exactly once (an Idempotency-Key, retried on no answer): the new values come back.
  ({ w, b } = await client.step(model, { w: { data: gw, shape: [FEATURES], dtype: "float32" }, b: float32([gb], []) }, {
    metrics: { loss },
  }));
  if (step % 50 === 0 || step === steps) console.log(`step ${step}: loss ${loss.toFixed(6)}`);
}
console.log(`w = [${[...w.data].map((v) => v.toFixed(3)).join(", ")}], b = ${b.data[0].toFixed(3)}`);
