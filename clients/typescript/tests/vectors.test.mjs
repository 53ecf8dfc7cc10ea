// The shared conformance vectors (tests/vectors/*.json, written by the Python SDK and the server's codecs).
import assert from "node:assert/strict";
import { test } from "node:test";
import * as mc from "../dist/index.js";
import { fromHex, hexOf, sameBits, vectors } from "./helpers.mjs";

/** Deep equality of parsed JSON that tells -0 from 0. */
function sameJSON(a, b) {
  if (typeof a === "number" && typeof b === "number") return Object.is(a, b);
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((x, i) => sameJSON(x, b[i]));
  if (a && typeof a === "object") {
    return b && typeof b === "object" && Object.keys(a).length === Object.keys(b).length &&
      Object.keys(a).every((k) => sameJSON(a[k], b[k]));
  }
  return a === b;
}

for (const c of vectors("tensors")) {
  test(`tensor ${c.name}: JSON from the server decodes to its exact bits, and encodes back to the same numbers`, () => {
    const expected = fromHex(c);
    const decoded = mc.decodeTensorJSON(JSON.parse(c.json));
    assert.ok(sameBits(decoded, expected), `${hexOf(decoded)} != ${c.hex}`);
    const written = mc.encodeTensorJSON(expected, c.name).text;
    assert.ok(sameJSON(JSON.parse(written), JSON.parse(c.json)), written);
    assert.ok(sameBits(mc.decodeTensorJSON(JSON.parse(written)), expected));
  });
}

for (const r of vectors("requests")) {
  test(`request ${r.name}: safetensors bytes equal the Python SDK's, JSON equal in value`, () => {
    const tensors = Object.fromEntries(Object.entries(r.tensors).map(([n, c]) => [n, fromHex(c)]));
    const half = r.kind === "gradients";
    const body = mc.encodeSafetensors(tensors, r.fields, "tensor", half);
    assert.equal(Buffer.from(body).toString("base64"), r.safetensors);
    // and the Python SDK's body reads back as the same tensors (16-bit ones widened to float32)
    const { tensors: read, metadata } = mc.decodeSafetensors(new Uint8Array(Buffer.from(r.safetensors, "base64")));
    assert.deepEqual(metadata, r.fields);
    for (const [n, c] of Object.entries(r.widened ?? r.tensors)) assert.ok(sameBits(read[n], fromHex(c)), n);
    const key = r.kind === "gradients" ? "gradients" : "params";
    const encoded = Object.fromEntries(Object.entries(tensors).map(([n, t]) => [n, mc.encodeTensorJSON(t, n, half)]));
    const json = JSON.parse(mc.stringify({ [key]: encoded, ...r.fields }));
    assert.ok(sameJSON(json, JSON.parse(r.json)), mc.stringify({ [key]: encoded, ...r.fields }));
  });
}

for (const r of vectors("responses")) {
  test(`response ${r.name}: the server's safetensors and JSON decode to the same bits`, () => {
    const body = new Uint8Array(Buffer.from(r.safetensors, "base64"));
    const { tensors, metadata } = mc.decodeSafetensors(body);
    assert.deepEqual(metadata, { params: r.params });
    for (const [n, c] of Object.entries(r.tensors)) {
      assert.ok(sameBits(tensors[n], fromHex(c)), n);
      assert.equal(tensors[n].data.buffer, body.buffer, `${n} is a view of the body (zero-copy)`);
    }
    const json = JSON.parse(r.json);
    for (const [n, p] of Object.entries(json.params)) {
      assert.ok(sameBits(mc.decodeTensorJSON(p), fromHex(r.tensors[n])), n);
      if (p.velocity) assert.ok(sameBits(mc.decodeTensorJSON(p.velocity), fromHex(r.tensors[`${n}@velocity`])));
    }
  });
}

test("safetensors: an unaligned tensor is copied, not refused; a lying header is refused", () => {
  const t = { data: new Float64Array([1.5, -0]), shape: [2], dtype: "float64" };
  const body = mc.encodeSafetensors({ x: t });
  const shifted = new Uint8Array(body.length + 3);
  shifted.set(body, 3);
  const { tensors } = mc.decodeSafetensors(shifted.subarray(3));
  assert.ok(sameBits(tensors.x, t));
  assert.notEqual(tensors.x.data.buffer, shifted.buffer);
  const lying = body.slice(0, body.length - 1);
  assert.throws(() => mc.decodeSafetensors(lying), /do not fit/);
  assert.throws(() => mc.decodeSafetensors(new Uint8Array(4)), /at least 8 bytes/);
});

test("bfloat16 rounding: to nearest even, as torch rounds", () => {
  const bits = mc.toBfloat16Bits([1, -1, 0.1, 3.0e38, -0]);
  assert.deepEqual([...bits], [0x3f80, 0xbf80, 0x3dcd, 0x7f62, 0x8000]);
});

for (const p of vectors("problems")) {
  test(`problem ${p.status} ${p.code}: ${p.class}`, () => {
    const headers = new Headers(p.headers ?? {});
    const e = mc.apiError(p.status, p.problem, { headers, method: "POST", url: "http://x/v1/models/m/step" });
    assert.equal(e.constructor.name, p.class);
    assert.ok(e instanceof mc[p.class] && e instanceof mc.APIError && e instanceof mc.MomentumError && e instanceof Error);
    assert.equal(e.code, p.code ?? null);
    assert.equal(e.status, p.status);
    if (p.current_steps) assert.deepEqual(e.currentSteps, p.current_steps);
    if (p.existing) assert.deepEqual(e.existing, p.existing);
    if ("retry_after" in p) assert.equal(e.retryAfter, p.retry_after);
    if (p.class === "ModelExists") assert.deepEqual(e.existingConfig, p.problem.existing);
    if (p.class === "Forbidden") assert.equal(e.required, "admin:mnist");
    if (p.class === "InvalidRequest" && p.problem.errors) assert.match(e.message, /body\.optimizer\.lr: lr must be >= 0/);
    if (p.class === "TensorMismatch") assert.equal(e.mismatches.w.expected.dtype, "float32");
    assert.ok(e.message.startsWith(`${p.status} `));
  });
}
