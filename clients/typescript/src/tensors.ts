/**
 * Tensors, and their two wires: JSON (`{"shape", "dtype", "data"}`, float64 decimals) and safetensors
 * (a codec of our own: it keeps `__metadata__`, widens BF16/F16, and reads tensors as views of the body).
 *
 * JSON numbers are written with the shortest decimal that parses back to the same float64; a float32
 * value is widened exactly, so the server's float64 parse and cast to float32 gives back its bits, and
 * reading casts the parsed float64 to float32 (`Float32Array`), which gives back the server's bits.
 * A negative zero is written `-0.0` (JSON.stringify would drop its sign).
 */

export type DType = "float32" | "float64" | "bfloat16" | "float16";
export type TensorData = Float32Array | Float64Array | Uint16Array;

/** A tensor: flat row-major `data`, `shape` (`[]` is a scalar). bfloat16/float16 (gradients only) hold raw bits. */
export interface Tensor {
  data: TensorData;
  shape: number[];
  dtype: DType;
}

export const SAFETENSORS = "application/x-safetensors";

const WIRE_DTYPE: Record<DType, string> = { float32: "F32", float64: "F64", bfloat16: "BF16", float16: "F16" };
const ITEMSIZE: Record<string, number> = { F32: 4, F64: 8, BF16: 2, F16: 2 };

export function size(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** A float32 tensor (the values rounded to float32). */
export function float32(data: ArrayLike<number>, shape?: number[]): Tensor {
  const a = Float32Array.from(data);
  return { data: a, shape: shape ?? [a.length], dtype: "float32" };
}

/** A float64 tensor. */
export function float64(data: ArrayLike<number>, shape?: number[]): Tensor {
  const a = Float64Array.from(data);
  return { data: a, shape: shape ?? [a.length], dtype: "float64" };
}

/** The bfloat16 bits of a float32 value, rounded to nearest even (as torch rounds). */
export function toBfloat16Bits(values: ArrayLike<number>): Uint16Array {
  const f = Float32Array.from(values);
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(u.length);
  for (let i = 0; i < u.length; i++) {
    const x = u[i];
    if ((x & 0x7fffffff) > 0x7f800000) out[i] = (x >>> 16) | 0x40; // NaN stays NaN
    else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** bfloat16 bits widened to float32, exactly. */
export function bfloat16ToFloat32(bits: Uint16Array): Float32Array {
  const u = new Uint32Array(bits.length);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return new Float32Array(u.buffer);
}

/** float16 bits widened to float32, exactly. */
export function float16ToFloat32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) {
    const h = bits[i];
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) out[i] = sign * frac * 2 ** -24;
    else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return out;
}

function checkTensor(t: Tensor, what: string, half: boolean): void {
  if (t === null || typeof t !== "object") throw new TypeError(`${what} must be a tensor {data, shape, dtype}`);
  if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new TypeError(`${what}: shape must be an array of non-negative integers, got ${JSON.stringify(t.shape)}`);
  }
  const ok =
    (t.dtype === "float32" && t.data instanceof Float32Array) ||
    (t.dtype === "float64" && t.data instanceof Float64Array) ||
    (half && (t.dtype === "bfloat16" || t.dtype === "float16") && t.data instanceof Uint16Array);
  if (!ok) {
    throw new TypeError(
      `${what}: dtype ${t.dtype} with ${t.data?.constructor?.name}; use float32 + Float32Array or float64 + Float64Array` +
        (half ? " (or bfloat16/float16 + Uint16Array of raw bits)" : ""),
    );
  }
  if (t.data.length !== size(t.shape)) {
    throw new RangeError(`${what}: ${t.data.length} values, shape [${t.shape}] needs ${size(t.shape)}`);
  }
}

// -- JSON --------------------------------------------------------------------------------

/** A number as JSON text: shortest round-trip float64 decimal, `-0.0` for negative zero. */
export function jsonNumber(v: number, what = "value"): string {
  if (!Number.isFinite(v)) throw new RangeError(`${what} contains ${v}; JSON cannot carry NaN or infinity`);
  if (v === 0 && Object.is(v, -0)) return "-0.0";
  return String(v);
}

/** A marker for the JSON writer: text written as is. */
export class RawJSON {
  constructor(readonly text: string) {}
}

/** JSON text for a request body; `RawJSON` values are written as they are. */
export function stringify(value: unknown): string {
  if (value instanceof RawJSON) return value.text;
  if (typeof value === "number") return jsonNumber(value);
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(stringify).join(",") + "]";
  const parts: string[] = [];
  for (const [k, v] of Object.entries(value)) if (v !== undefined) parts.push(JSON.stringify(k) + ":" + stringify(v));
  return "{" + parts.join(",") + "}";
}

/** The JSON tensor object for `t` (bfloat16/float16 go as float32, exactly). */
export function encodeTensorJSON(t: Tensor, what: string, half = false): RawJSON {
  checkTensor(t, what, half);
  let data: Float32Array | Float64Array;
  let dtype = t.dtype;
  if (t.dtype === "bfloat16") [data, dtype] = [bfloat16ToFloat32(t.data as Uint16Array), "float32"];
  else if (t.dtype === "float16") [data, dtype] = [float16ToFloat32(t.data as Uint16Array), "float32"];
  else data = t.data as Float32Array | Float64Array;
  const nums = new Array<string>(data.length);
  for (let i = 0; i < data.length; i++) nums[i] = jsonNumber(data[i], what);
  return new RawJSON(`{"shape":[${t.shape.join(",")}],"dtype":"${dtype}","data":[${nums.join(",")}]}`);
}

/** The tensor for a JSON tensor object (already parsed: numbers are float64, cast here to the dtype). */
export function decodeTensorJSON(obj: unknown): Tensor {
  if (obj === null || typeof obj !== "object") throw new TypeError("a tensor must be a JSON object");
  const { shape, dtype, data } = obj as Record<string, unknown>;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new TypeError(`tensor shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
  }
  if (dtype !== "float32" && dtype !== "float64") throw new TypeError(`tensor dtype ${JSON.stringify(dtype)}`);
  if (!Array.isArray(data) || !data.every((x) => typeof x === "number")) throw new TypeError("tensor data must be numbers");
  if (data.length !== size(shape)) throw new TypeError(`tensor data has ${data.length} numbers, shape needs ${size(shape)}`);
  const arr = dtype === "float32" ? Float32Array.from(data) : Float64Array.from(data);
  return { data: arr, shape: shape as number[], dtype };
}

// -- safetensors -------------------------------------------------------------------------

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * A safetensors body: the header (JSON, padded with spaces so the data starts 8-byte aligned), then
 * the tensors widest dtype first (so every tensor is aligned for a view on the other side).
 * `metadata` values are written as JSON text, as the API wants them.
 */
export function encodeSafetensors(
  tensors: Record<string, Tensor>,
  metadata: Record<string, unknown> = {},
  what = "tensor",
  half = false,
): Uint8Array {
  if (!LITTLE_ENDIAN) throw new Error("safetensors: big-endian platforms are not supported; use wire: 'json'");
  const entries = Object.entries(tensors).map(([name, t]) => {
    checkTensor(t, `${what} ${JSON.stringify(name)}`, half);
    return { name, t, wire: WIRE_DTYPE[t.dtype], bytes: t.data.byteLength };
  });
  entries.sort((a, b) => ITEMSIZE[b.wire] - ITEMSIZE[a.wire]); // stable: the given order within a width
  const header: Record<string, unknown> = {};
  const metaKeys = Object.keys(metadata).filter((k) => metadata[k] !== undefined);
  if (metaKeys.length) {
    const meta: Record<string, string> = {};
    for (const k of metaKeys) meta[k] = stringify(metadata[k]);
    header.__metadata__ = meta;
  }
  let offset = 0;
  for (const e of entries) {
    if (e.t.dtype === "float32" || e.t.dtype === "float64") {
      const d = e.t.data as Float32Array | Float64Array;
      // an indexed loop (x - x is NaN exactly for NaN and ±Infinity): for-of over a typed array is far slower
      for (let i = 0, n = d.length; i < n; i++) {
        const x = d[i];
        if (x - x !== 0) throw new RangeError(`${what} ${JSON.stringify(e.name)} contains ${x} at flat index ${i}`);
      }
    }
    header[e.name] = { dtype: e.wire, shape: e.t.shape, data_offsets: [offset, offset + e.bytes] };
    offset += e.bytes;
  }
  const text = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - ((text.length + 8) % 8)) % 8;
  const body = new Uint8Array(8 + text.length + pad + offset);
  const view = new DataView(body.buffer);
  view.setUint32(0, text.length + pad, true);
  view.setUint32(4, Math.floor((text.length + pad) / 2 ** 32), true);
  body.set(text, 8);
  body.fill(0x20, 8 + text.length, 8 + text.length + pad);
  let at = 8 + text.length + pad;
  for (const e of entries) {
    body.set(new Uint8Array(e.t.data.buffer, e.t.data.byteOffset, e.bytes), at);
    at += e.bytes;
  }
  return body;
}

export interface DecodedSafetensors {
  tensors: Record<string, Tensor>;
  /** `__metadata__`, each value parsed from its JSON text. */
  metadata: Record<string, unknown>;
}

/**
 * Read a safetensors body. F32/F64 tensors are views of `body` where their offset is aligned (a copy
 * otherwise); BF16 and F16 are widened to float32, exactly. Throws `Error` when the body is not valid.
 */
export function decodeSafetensors(body: Uint8Array): DecodedSafetensors {
  if (!LITTLE_ENDIAN) throw new Error("safetensors: big-endian platforms are not supported; use wire: 'json'");
  if (body.length < 8) throw new Error(`a safetensors body has at least 8 bytes, got ${body.length}`);
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const n = dv.getUint32(0, true) + dv.getUint32(4, true) * 2 ** 32;
  if (n > body.length - 8) throw new Error(`the header length ${n} exceeds the body`);
  const header = JSON.parse(new TextDecoder().decode(body.subarray(8, 8 + n)));
  if (header === null || typeof header !== "object" || Array.isArray(header)) throw new Error("the header is not a JSON object");
  const rawMeta = header.__metadata__ ?? {};
  delete header.__metadata__;
  const start = 8 + n;
  const dataLength = body.length - start;
  const tensors: Record<string, Tensor> = {};
  for (const [name, info] of Object.entries(header) as Array<[string, any]>) {
    const wire = info?.dtype;
    const itemsize = ITEMSIZE[wire];
    if (!itemsize) throw new Error(`tensor ${JSON.stringify(name)}: unknown or missing dtype ${JSON.stringify(wire)}`);
    const shape = info.shape;
    if (!Array.isArray(shape) || !shape.every((d: unknown) => Number.isInteger(d) && (d as number) >= 0)) {
      throw new Error(`tensor ${JSON.stringify(name)}: bad shape`);
    }
    const [begin, end] = Array.isArray(info.data_offsets) ? info.data_offsets : [NaN, NaN];
    if (!(Number.isInteger(begin) && Number.isInteger(end) && 0 <= begin && begin <= end && end <= dataLength) ||
        size(shape) * itemsize !== end - begin) {
      throw new Error(`tensor ${JSON.stringify(name)}: data_offsets ${JSON.stringify(info.data_offsets)} do not fit`);
    }
    const byteOffset = body.byteOffset + start + begin;
    const count = (end - begin) / itemsize;
    const aligned = byteOffset % itemsize === 0;
    const bytes = aligned ? null : body.slice(start + begin, start + end);
    const buf = bytes ? bytes.buffer : body.buffer;
    const off = bytes ? 0 : byteOffset;
    let t: Tensor;
    if (wire === "F32") t = { data: new Float32Array(buf, off, count), shape, dtype: "float32" };
    else if (wire === "F64") t = { data: new Float64Array(buf, off, count), shape, dtype: "float64" };
    else if (wire === "BF16") t = { data: bfloat16ToFloat32(new Uint16Array(buf, off, count)), shape, dtype: "float32" };
    else t = { data: float16ToFloat32(new Uint16Array(buf, off, count)), shape, dtype: "float32" };
    tensors[name] = t;
  }
  if (rawMeta === null || typeof rawMeta !== "object" || Array.isArray(rawMeta)) throw new Error("__metadata__ is not a JSON object");
  const metadata: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(rawMeta)) metadata[k] = JSON.parse(String(v));
  return { tensors, metadata };
}
