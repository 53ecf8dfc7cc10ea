// Shared by the tests: vectors, typed arrays from hex, and real server / Redis processes.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, "../../..");
export const VENV = process.env.MOMENTUM_VENV ?? path.join(REPO, ".venv");

export function vectors(name) {
  return JSON.parse(readFileSync(path.join(HERE, "vectors", `${name}.json`), "utf8"));
}

const ARRAYS = { float32: Float32Array, float64: Float64Array, bfloat16: Uint16Array, float16: Uint16Array };

/** A tensor {data, shape, dtype} from a vector case (little-endian bytes as hex). */
export function fromHex(c) {
  const bytes = Buffer.from(c.hex, "hex");
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  const T = ARRAYS[c.dtype];
  return { data: new T(copy.buffer, 0, copy.length / T.BYTES_PER_ELEMENT), shape: c.shape, dtype: c.dtype };
}

export function hexOf(t) {
  return Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).toString("hex");
}

/** Bitwise equality of two tensors (dtype, shape and every bit, signed zeros included). */
export function sameBits(a, b) {
  return a.dtype === b.dtype && JSON.stringify(a.shape) === JSON.stringify(b.shape) && hexOf(a) === hexOf(b);
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitFor(check, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${what} did not come up within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A momentum-service process on `port` (a free one by default); `redisUrl` for Redis, `env` for settings. */
export async function startServer({ port, redisUrl, env = {} } = {}) {
  port = port ?? (await freePort());
  const args = ["serve", "--port", String(port), "--log-level", "warning"];
  if (redisUrl) args.push("--redis-url", redisUrl);
  const child = spawn(path.join(VENV, "bin", "momentum-service"), args, {
    env: { ...process.env, MOMENTUM_API_KEY: "", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const url = `http://127.0.0.1:${port}`;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  await Promise.race([
    waitFor(async () => (await fetch(`${url}/healthz`)).ok, 30000, "momentum-service"),
    exited.then(() => {
      throw new Error(`momentum-service exited: ${stderr}`);
    }),
  ]);
  return {
    url,
    port,
    child,
    async stop(signal = "SIGTERM") {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await exited;
    },
  };
}

/** A throwaway redis-server (no persistence) on a free port. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  await waitFor(
    () =>
      new Promise((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => {
          s.end();
          resolve(true);
        });
        s.on("error", () => resolve(false));
      }),
    10000,
    "redis-server",
  );
  return {
    url: `redis://127.0.0.1:${port}`,
    child,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGCONT");
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** A fetch that answers the i-th request with `script[i]` (a function of the request's init; the last one
 * for every request past the script) and records each request: url, method, headers, base64 body, time. */
export function scripted(script) {
  const seen = [];
  const f = async (url, init) => {
    const body = init.body === undefined ? undefined : Buffer.from(init.body).toString("base64");
    seen.push({ url, method: init.method, headers: { ...init.headers }, body, at: performance.now() });
    const next = script[Math.min(seen.length - 1, script.length - 1)];
    return next(init);
  };
  return { fetch: f, seen };
}
