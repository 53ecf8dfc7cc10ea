// Steps/s of this client beside the Python SDK's, against one server (each step pushes one gradient
// per parameter and receives the updated values, as bench/ does), sequential, one worker.
//
//   node examples/bench.mjs [seconds per run]      (starts an embedded server from the repository's .venv)
import { execFileSync } from "node:child_process";
import path from "node:path";
import { Client } from "momentum-client";
import { startServer, VENV } from "../tests/helpers.mjs";

const seconds = Number(process.argv[2] ?? 3);
const WORKLOADS = { "tiny (1,000 floats)": [1000], "mlp-sized (8 params, ~1M floats)": [784 * 512, 512, 512 * 512, 512, 512 * 256, 256, 256 * 10, 10] };

async function tsRun(url, wire, sizes, model) {
  const c = new Client(url, { wire });
  // the Python run left this process's pooled connection idle past the server's keep-alive timeout:
  // a probe takes the stale socket's error (health() is false on no answer) before the real calls
  await c.health();
  await c.createModel(model, { lr: 0.01, momentum: 0.9 });
  const params = Object.fromEntries(sizes.map((n, i) => [`p${i}`, { data: new Float32Array(n).fill(0.5), shape: [n], dtype: "float32" }]));
  await c.initParams(model, params);
  const grads = Object.fromEntries(sizes.map((n, i) => [`p${i}`, { data: new Float32Array(n).fill(1e-3), shape: [n], dtype: "float32" }]));
  for (let i = 0; i < 5; i++) await c.step(model, grads);
  let steps = 0;
  const start = performance.now();
  while (performance.now() - start < seconds * 1000) {
    await c.step(model, grads);
    steps++;
  }
  return steps / ((performance.now() - start) / 1000);
}

function pyRun(url, wire, sizes, model) {
  const script = `
import sys, time, json
import numpy as np
import momentum_client as mc
url, wire, sizes, model, seconds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], float(sys.argv[5])
c = mc.Client(url, wire=wire)
c.create_model(model, lr=0.01, momentum=0.9)
c.init_params(model, {f"p{i}": np.full(n, 0.5, np.float32) for i, n in enumerate(sizes)})
grads = {f"p{i}": np.full(n, 1e-3, np.float32) for i, n in enumerate(sizes)}
for _ in range(5):
    c.step(model, grads)
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    c.step(model, grads)
    steps += 1
print(steps / (time.perf_counter() - start))
`;
  const out = execFileSync(path.join(VENV, "bin", "python"), ["-c", script, url, wire, JSON.stringify(sizes), model, String(seconds)], { encoding: "utf8" });
  return Number(out.trim());
}

const server = await startServer();
try {
  console.log("| workload | wire | Python SDK steps/s | TypeScript steps/s |");
  console.log("|---|---|---:|---:|");
  let k = 0;
  for (const [name, sizes] of Object.entries(WORKLOADS)) {
    for (const wire of ["safetensors", "json"]) {
      const py = pyRun(server.url, wire, sizes, `bench-py-${k}`);
      const ts = await tsRun(server.url, wire, sizes, `bench-ts-${k}`);
      k++;
      console.log(`| ${name} | ${wire} | ${py.toFixed(1)} | ${ts.toFixed(1)} |`);
    }
  }
} finally {
  await server.stop();
}
