import {
  APIError,
  apiError,

  MomentumError,
  ModelExists,
  PreconditionFailed,
  parseRetryAfter,
  RequestTimeout,
  StepTimeout,
  StepWentBack,
  TensorMismatch,
  TransportError,
  UnexpectedResponse,
} from "./errors.js";
import {
  decodeSafetensors,
  decodeTensorJSON,
  encodeSafetensors,
  encodeTensorJSON,
  RawJSON,
  SAFETENSORS,
  stringify,
  Tensor,
} from "./tensors.js";
import { OwnerRoutes } from "./routing.js";

export const VERSION = "0.1.0";

/** How tensors travel: `"safetensors"` (binary, the default) or `"json"`. */
export type Wire = "safetensors" | "json";

export interface ClientOptions {
  /** Bearer API key; by default `MOMENTUM_API_KEY` from the environment (Node), else none. */
  apiKey?: string;
  /** Seconds each HTTP request may take (default 10; 0 or null: no limit). */
  timeout?: number | null;
  /** Retries of a step after a transient failure, in a row (default 5). */
  maxRetries?: number;
  /** Seconds a sync-mode step re-sends its push while the server answers 202 (default 300). */
  syncWait?: number;
  /** `"safetensors"` (default) or `"json"`. */
  wire?: Wire;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
  /** Aborts every request of this client (each call also takes its own `signal`). */
  signal?: AbortSignal;
  /**
   * A step whose answer has a parameter's step not past one this client saw before (acknowledged
   * steps were lost): `"raise"` (default) throws StepWentBack after the step was applied; `"warn"`
   * emits a warning and returns the result.
   */
  onStepBack?: "raise" | "warn";
  /**
   * Cast float32/float64 gradients to their parameters' dtypes: learnt from step answers, or from a
   * 409 tensor-mismatch in dtypes only, after which the step is sent again, cast (default false).
   */
  castGradients?: boolean;
  /**
   * Send each model's requests to the server replica that owns it, once a forwarded answer named it
   * (`Momentum-Owner`): one hop instead of two. If that replica does not answer, or answers 503, the
   * model's requests go back to `baseUrl`. Off by default: behind a load balancer the replicas' own
   * URLs may not be reachable (default false).
   */
  followOwner?: boolean;
  /** For tests: random numbers in [0, 1) for the backoff jitter. */
  random?: () => number;
}

export interface CallOptions {
  signal?: AbortSignal;
}

/** The keyword options of `step`, `stepResults` and `pushGradients`. */
export interface StepOptions extends CallOptions {
  /** `{name: step}`: apply only if those parameters are at those steps (else Conflict `step-mismatch`). */
  expectedSteps?: Record<string, number>;
  /** This worker's id (sync mode). */
  workerId?: number;
  /** The step the gradients were computed from (sync and bounded modes; gives `staleness`). */
  baseStep?: number;
  /** The key to send (1 to 255 visible ASCII characters); a fresh one per call by default. */
  idempotencyKey?: string;
  /** Training scalars kept with the push (`{loss: 0.31}`). */
  metrics?: Record<string, number>;
}

export interface StepResult {
  /** The new value (null with `returnParams: false`). */
  value: Tensor | null;
  step: number;
  lr: number;
  /** On a replay whose parameter moved on since: its step now. */
  currentStep: number | null;
  /** The server answered with the result of an earlier attempt with this key. */
  replayed: boolean;
  /** With `baseStep`: updates other pushes applied since it. */
  staleness: number | null;
}

export interface ParamState {
  name: string;
  value: Tensor;
  velocity: Tensor | null;
  step: number;
  /** Every state buffer of the rule, by name (`velocity` among them). */
  state: Record<string, Tensor>;
}

/** The hyperparameters (camelCase; sent as the API names them: `weight_decay`). */
export interface Hyperparameters {
  lr?: number;
  momentum?: number;
  dampening?: number;
  nesterov?: boolean;
  weightDecay?: number;
  maximize?: boolean;
}

/** When a step is acknowledged with Redis: `"step"` (once logged) or `{flushMs: N}` (from the owner's memory). */
export type Durability = "step" | { flushMs: number } | { replicas: number };

/** A model's config, as `createModel` and `replaceModel` take it (the Python SDK's keyword arguments). */
export interface ModelConfig extends Hyperparameters {
  lr: number;
  /** `"pytorch"` (default), `"keras"`, `"tf1"`, `"ema"`, `"previous_delta"`. */
  rule?: string;
  /** In the API's form, e.g. `{type: "cosine", T_max: 1000}` (default constant). */
  schedule?: Record<string, unknown>;
  mode?: "async" | "sync" | "bounded";
  workers?: number;
  maxStaleness?: number;
  durability?: Durability;
  /** In the API's form: `[{params: ["*.bias"], weight_decay: 0}]`. */
  groups?: Array<Record<string, unknown>>;
  /** Split the parameters over this many owners (2 to 64, async mode; see the README's "Scaling out"). */
  shards?: number;
}

export interface CreateModelOptions extends ModelConfig, CallOptions {
  /** Return the existing model (unchanged) instead of throwing ModelExists. */
  existOk?: boolean;
}

/** What `updateModel` may change (at least one): hyperparameters, the schedule, mode fields, durability, groups. */
export interface ModelUpdate extends Hyperparameters, CallOptions {
  schedule?: Record<string, unknown>;
  mode?: "async" | "sync" | "bounded";
  workers?: number;
  maxStaleness?: number;
  durability?: Durability;
  /** A list replaces the groups; `{groupName: changes}` changes those groups. */
  groups?: Array<Record<string, unknown>> | Record<string, Record<string, unknown>>;
}

/** A model as the server describes it (`GET /v1/models/{model}`), fields as the API names them. */
export interface ModelInfo {
  name: string;
  optimizer: Record<string, unknown> & { rule: string; lr: number };
  schedule: Record<string, unknown>;
  mode: string;
  durability: unknown;
  params: Record<string, { shape: number[]; dtype: string; step: number }>;
  [key: string]: unknown;
}

export interface ModelSummary {
  name: string;
  rule: string;
  mode: string;
  params: number;
  steps: number;
}

const NEUTRAL: Record<string, unknown> = { dampening: 0, nesterov: false, weight_decay: 0, maximize: false };
const KEY = /^[\x21-\x7e]{1,255}$/;
const BINARY_ACCEPT = `${SAFETENSORS}, application/json, application/problem+json`;
const JSON_ACCEPT = "application/json, application/problem+json";
const FRESH_KEY = "Momentum-Fresh-Key";
const BACKOFF_BASE = 0.05;
const BACKOFF_CAP = 2.0;

interface Req {
  method: string;
  path: string;
  query?: Record<string, string>;
  headers?: Record<string, string>;
  body?: Uint8Array | string;
}

interface Res {
  status: number;
  headers: Headers;
  body: Uint8Array;
  method: string;
  url: string;
}

function segment(name: string, what: string): string {
  if (typeof name !== "string") throw new TypeError(`${what} name must be a string`);
  if (name === "" || name === "." || name === "..") throw new RangeError(`${what} name ${JSON.stringify(name)} cannot be a URL path segment`);
  return encodeURIComponent(name);
}

function modelPath(model: string): string {
  return `/v1/models/${segment(model, "model")}`;
}

function paramPath(model: string, name: string): string {
  return `${modelPath(model)}/params/${segment(name, "parameter")}`;
}

function asIndex(value: unknown, what: string): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value)) throw new TypeError(`${what} must be an integer, got ${String(value)}`);
  return value;
}

function envApiKey(): string | undefined {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return p?.env?.MOMENTUM_API_KEY;
}

function sleep(seconds: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, seconds * 1000);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function expectInt(v: unknown, what: string): number {
  if (!Number.isInteger(v)) throw new TypeError(`${what} is not an integer: ${JSON.stringify(v)}`);
  return v as number;
}

function optionalInt(v: unknown, what: string): number | null {
  return v === undefined || v === null ? null : expectInt(v, what);
}

/** One parameter of a params or step answer: value, velocity, and its fields (step, lr, ...). */
type Entry = { value: Tensor | null; velocity: Tensor | null; fields: Record<string, unknown> };

/**
 * A client of momentum-service. Every method is async; errors are the classes of `errors.ts`.
 * Steps (`step`, `stepResults`, `pushGradients`) are sent with an `Idempotency-Key` and retried on
 * no answer, 502/503/504 and 409 `idempotency-in-flight`, with the same bytes and key: applied exactly once.
 */
export class Client {
  readonly baseUrl: string;
  readonly wire: Wire;
  readonly maxRetries: number;
  readonly syncWait: number;
  readonly timeout: number | null;
  private readonly headers: Record<string, string>;
  private readonly fetchImpl: typeof fetch;
  private readonly signal?: AbortSignal;
  private readonly random: () => number;
  private readonly onStepBack: "raise" | "warn";
  /** The highest step seen per model and parameter. */
  private readonly seen = new Map<string, Map<string, number>>();
  /** Parameters' dtypes as learnt by a client that casts gradients, per model. */
  private readonly dtypes: Map<string, Map<string, "float32" | "float64">> | null;
  /** Where each model's requests go (see `followOwner`). */
  private readonly routes: OwnerRoutes;

  constructor(baseUrl: string, options: ClientOptions = {}) {
    let url: URL;
    try {
      url = new URL(baseUrl);
    } catch {
      throw new TypeError(`baseUrl must be an absolute http:// or https:// URL, got ${JSON.stringify(baseUrl)}`);
    }
    if ((url.protocol !== "http:" && url.protocol !== "https:") || url.search || url.hash) {
      throw new TypeError(`baseUrl must be an absolute http(s) URL without query or fragment, got ${JSON.stringify(baseUrl)}`);
    }
    this.baseUrl = url.toString().replace(/\/+$/, "");
    const wire = options.wire ?? "safetensors";
    if (wire !== "safetensors" && wire !== "json") throw new RangeError(`wire must be "safetensors" or "json", got ${JSON.stringify(wire)}`);
    this.wire = wire;
    this.maxRetries = options.maxRetries ?? 5;
    if (!Number.isInteger(this.maxRetries) || this.maxRetries < 0) throw new RangeError("maxRetries must be an integer >= 0");
    this.syncWait = options.syncWait ?? 300;
    if (!(this.syncWait >= 0)) throw new RangeError("syncWait must be >= 0 seconds");
    this.timeout = options.timeout === undefined ? 10 : options.timeout || null;
    const key = options.apiKey ?? envApiKey();
    this.headers = { ...(options.headers ?? {}) };
    if (key) {
      if (!/^[\x21-\x7e]{1,1024}$/.test(key)) throw new RangeError("apiKey must be printable ASCII without spaces");
      this.headers.Authorization = `Bearer ${key}`;
    }
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("no fetch: pass options.fetch");
    this.fetchImpl = f.bind(globalThis);
    this.signal = options.signal;
    this.random = options.random ?? Math.random;
    this.onStepBack = options.onStepBack ?? "raise";
    this.dtypes = options.castGradients ? new Map() : null;
    this.routes = new OwnerRoutes(this.baseUrl, options.followOwner ?? false);
    if (this.onStepBack !== "raise" && this.onStepBack !== "warn") throw new RangeError('onStepBack must be "raise" or "warn"');
  }

  // -- models --------------------------------------------------------------------------

  /** Create the model; an existing one is never changed (ModelExists, or with `existOk` it is returned). */
  async createModel(model: string, options: CreateModelOptions): Promise<ModelInfo> {
    const body = modelBody(options);
    const res = await this.send(jsonRequest("PUT", modelPath(model), body, { "If-None-Match": "*" }), options.signal);
    this.forget(model);
    if (res.status === 412 && options.existOk) {
      const error = this.error(res);
      if (!(error instanceof ModelExists)) throw error;
      const differences = configDifferences(body, error.existingConfig);
      if (differences.length) {
        warn(
          `model ${JSON.stringify(model)} exists with another config than asked for, and was left as it is: ${differences.join("; ")}`,
          "ModelConfigWarning",
        );
      }
      return this.getModel(model, options);
    }
    return this.parse(res, (b) => b as ModelInfo);
  }

  /** Create the model, or replace its config (parameters are kept; the rule cannot change). */
  async replaceModel(model: string, options: ModelConfig & CallOptions): Promise<ModelInfo> {
    const res = await this.send(jsonRequest("PUT", modelPath(model), modelBody(options)), options.signal);
    return this.parse(res, (b) => b as ModelInfo);
  }

  /** Change some hyperparameters, the schedule, mode fields, durability and/or groups (from the next step on). */
  async updateModel(model: string, update: ModelUpdate): Promise<ModelInfo> {
    const { signal, ...fields } = update;
    const res = await this.send(jsonRequest("PATCH", modelPath(model), updateBody(fields)), signal);
    return this.parse(res, (b) => b as ModelInfo);
  }

  async getModel(model: string, options: CallOptions = {}): Promise<ModelInfo> {
    const res = await this.send({ method: "GET", path: modelPath(model) }, options.signal);
    return this.parse(res, (b) => b as ModelInfo);
  }

  async deleteModel(model: string, options: CallOptions = {}): Promise<void> {
    this.check(await this.send({ method: "DELETE", path: modelPath(model) }, options.signal));
    this.forget(model);
  }

  /** Every model the key may read, in name order (all pages). */
  async listModels(options: CallOptions & { pageSize?: number } = {}): Promise<ModelSummary[]> {
    const out: ModelSummary[] = [];
    let after: string | null = null;
    for (;;) {
      const query: Record<string, string> = { limit: String(options.pageSize ?? 100) };
      if (after !== null) query.after = after;
      const res = await this.send({ method: "GET", path: "/v1/models", query }, options.signal);
      const page = this.parse(res, (b) => {
        if (!isObject(b) || !Array.isArray(b.models)) throw new TypeError("no models");
        return { models: b.models as ModelSummary[], next: (b.next ?? null) as string | null };
      });
      out.push(...page.models);
      if (page.next === null) return out;
      after = page.next;
    }
  }

  /** The model whole, as a safetensors file (values, state, steps, config). */
  async saveCheckpoint(model: string, options: CallOptions = {}): Promise<Uint8Array> {
    const res = await this.send({ method: "GET", path: `${modelPath(model)}/checkpoint`, headers: { Accept: SAFETENSORS } }, options.signal);
    this.check(res);
    return res.body;
  }

  /** Restore a checkpoint as `model`: created, or replaced whole (`replace: false` only creates). */
  async loadCheckpoint(model: string, file: Uint8Array, options: CallOptions & { replace?: boolean } = {}): Promise<ModelInfo> {
    const headers: Record<string, string> = { "Content-Type": SAFETENSORS };
    if (options.replace === false) headers["If-None-Match"] = "*";
    const res = await this.send({ method: "PUT", path: `${modelPath(model)}/checkpoint`, headers, body: file }, options.signal);
    const info = this.parse(res, (b) => b as ModelInfo);
    this.forget(model);
    return info;
  }

  // -- parameters ----------------------------------------------------------------------

  /**
   * Upload initial values; returns `{name: created}`. With `existOk`, existing parameters are never
   * overwritten (If-None-Match: *; the existing ones are marked false and the rest sent again).
   */
  async initParams(model: string, params: Record<string, Tensor>, options: CallOptions & { existOk?: boolean } = {}): Promise<Record<string, boolean>> {
    const path = `${modelPath(model)}/params`;
    const pending: Record<string, Tensor> = { ...params };
    const created: Record<string, boolean> = {};
    while (Object.keys(pending).length) {
      const req = this.tensorRequest("PUT", path, pending, {}, "parameter", false);
      if (options.existOk) req.headers = { ...req.headers, "If-None-Match": "*" };
      const res = await this.send(req, options.signal);
      if (options.existOk && res.status === 412) {
        const error = this.error(res) as PreconditionFailed;
        const existing = error.existing.filter((n) => n in pending);
        if (!existing.length) throw error;
        for (const n of existing) {
          created[n] = false;
          delete pending[n];
        }
        continue;
      }
      const flags = this.parse(res, (b) => {
        const out: Record<string, boolean> = {};
        for (const [n, p] of Object.entries((b as { params: Record<string, { created: boolean }> }).params)) out[n] = p.created === true;
        return out;
      });
      for (const n of Object.keys(pending)) {
        if (!(n in flags)) throw this.unexpected(res, `no result for parameter ${JSON.stringify(n)}`);
        created[n] = flags[n];
      }
      break;
    }
    const out: Record<string, boolean> = {};
    for (const n of Object.keys(params)) out[n] = created[n];
    this.forget(model, Object.keys(out).filter((n) => out[n] || !options.existOk));
    return out;
  }

  /** All parameters' values, or only `names`. */
  async getParams(model: string, names?: string[], options: CallOptions = {}): Promise<Record<string, Tensor>> {
    const query: Record<string, string> = {};
    if (names !== undefined) {
      const wanted = [...new Set(names)];
      for (const n of wanted) {
        segment(n, "parameter");
        if (n.includes(",")) throw new RangeError(`parameter name ${JSON.stringify(n)} contains ',' and cannot be listed`);
      }
      if (!wanted.length) return {};
      query.names = wanted.join(",");
    }
    const headers = this.wire === "safetensors" ? { Accept: BINARY_ACCEPT } : undefined;
    const res = await this.send({ method: "GET", path: `${modelPath(model)}/params`, query, headers }, options.signal);
    const out: Record<string, Tensor> = {};
    for (const [n, e] of Object.entries(this.entries(res))) {
      if (e.value === null) throw this.unexpected(res, `no value for parameter ${JSON.stringify(n)}`);
      out[n] = e.value;
    }
    return out;
  }

  /** One parameter with its rule's state (the velocity among it) and its step. */
  async getParamState(model: string, name: string, options: CallOptions = {}): Promise<ParamState> {
    const path = paramPath(model, name);
    if (this.wire === "safetensors") {
      const res = await this.send({ method: "GET", path, query: { include: "state" }, headers: { Accept: BINARY_ACCEPT } }, options.signal);
      if (isBinary(res)) {
        this.check(res);
        try {
          const { tensors, metadata } = decodeSafetensors(res.body);
          const fields = (metadata.params as Record<string, Record<string, unknown>>)[name];
          const value = tensors[name];
          if (!value) throw new TypeError(`no value for parameter ${JSON.stringify(name)}`);
          const state: Record<string, Tensor> = {};
          for (const [k, t] of Object.entries(tensors)) if (k.startsWith(`${name}@`)) state[k.slice(name.length + 1)] = t;
          return { name, value, velocity: state.velocity ?? null, step: expectInt(fields.step, "step"), state };
        } catch (e) {
          throw this.unexpected(res, String(e), e);
        }
      }
      return this.parse(res, parseState);
    }
    const res = await this.send({ method: "GET", path, query: { include: "state" } }, options.signal);
    return this.parse(res, parseState);
  }

  async deleteParam(model: string, name: string, options: CallOptions = {}): Promise<void> {
    this.check(await this.send({ method: "DELETE", path: paramPath(model, name) }, options.signal));
    this.forget(model, [name]);
  }

  // -- steps -----------------------------------------------------------------------------

  /** Apply one optimizer step with `gradients`, exactly once; returns the updated values. */
  async step(model: string, gradients: Record<string, Tensor>, options: StepOptions = {}): Promise<Record<string, Tensor>> {
    const results = await this.stepResults(model, gradients, { ...options, returnParams: true });
    const out: Record<string, Tensor> = {};
    for (const [n, r] of Object.entries(results)) out[n] = r.value!;
    return out;
  }

  /** Apply one optimizer step; returns each parameter's value (null with `returnParams: false`), step, lr, staleness. */
  async stepResults(
    model: string,
    gradients: Record<string, Tensor>,
    options: StepOptions & { returnParams?: boolean } = {},
  ): Promise<Record<string, StepResult>> {
    const returnParams = options.returnParams ?? true;
    const known = this.known(model, Object.keys(gradients));
    let res = await this.postStep(model, this.cast(model, gradients), returnParams, options);
    if (this.dtypes !== null && res.status === 409) {
      // a client that casts: a mismatch in dtypes only teaches the parameters' dtypes; send again, cast
      const error = this.error(res);
      const mismatches = error instanceof TensorMismatch ? Object.entries(error.mismatches) : [];
      if (mismatches.length && mismatches.every(([, m]) => JSON.stringify(m.expected.shape) === JSON.stringify(m.got.shape))) {
        const learnt = this.dtypes.get(model) ?? new Map();
        this.dtypes.set(model, learnt);
        for (const [n, m] of mismatches) learnt.set(n, m.expected.dtype as "float32" | "float64");
        res = await this.postStep(model, this.cast(model, gradients), returnParams, options);
      }
    }
    const replayed = (res.headers.get("idempotent-replayed") ?? "").trim().toLowerCase() === "true";
    const out: Record<string, StepResult> = {};
    const entries = this.entries(res);
    try {
      for (const [n, e] of Object.entries(entries)) {
        if (returnParams && e.value === null) throw new TypeError(`no value for parameter ${JSON.stringify(n)}`);
        out[n] = {
          value: e.value,
          step: expectInt(e.fields.step, "step"),
          lr: e.fields.lr as number,
          currentStep: optionalInt(e.fields.current_step, "current_step"),
          replayed,
          staleness: optionalInt(e.fields.staleness, "staleness"),
        };
      }
    } catch (e) {
      throw this.unexpected(res, String(e), e);
    }
    if (this.dtypes !== null) {
      const learnt = this.dtypes.get(model) ?? new Map();
      this.dtypes.set(model, learnt);
      for (const [n, r] of Object.entries(out)) if (r.value) learnt.set(n, r.value.dtype as "float32" | "float64");
    }
    // A replay of the caller's own key may be an old step's answer: it says nothing about going back.
    if (!(replayed && options.idempotencyKey !== undefined && options.idempotencyKey !== null)) {
      this.saw(model, out, known);
    }
    return out;
  }

  /** Apply one optimizer step without downloading values; returns the new step counts. */
  async pushGradients(model: string, gradients: Record<string, Tensor>, options: StepOptions = {}): Promise<Record<string, number>> {
    const results = await this.stepResults(model, gradients, { ...options, returnParams: false });
    const out: Record<string, number> = {};
    for (const [n, r] of Object.entries(results)) out[n] = r.step;
    return out;
  }

  /** `GET /healthz`: true on 200, false on another status or no answer. */
  async health(options: CallOptions = {}): Promise<boolean> {
    return this.probe("/healthz", options.signal);
  }

  /** `GET /readyz`: true when the store is reachable. */
  async ready(options: CallOptions = {}): Promise<boolean> {
    return this.probe("/readyz", options.signal);
  }

  // -- internals -----------------------------------------------------------------------

  /** The gradients, each float32/float64 one cast to its parameter's dtype where that is known. */
  private cast(model: string, gradients: Record<string, Tensor>): Record<string, Tensor> {
    const learnt = this.dtypes?.get(model);
    if (!learnt) return gradients;
    const out: Record<string, Tensor> = {};
    for (const [n, t] of Object.entries(gradients)) {
      const want = learnt.get(n);
      if (want === undefined || t.dtype === want || (t.dtype !== "float32" && t.dtype !== "float64")) out[n] = t;
      else out[n] = { data: want === "float32" ? Float32Array.from(t.data) : Float64Array.from(t.data), shape: t.shape, dtype: want };
    }
    return out;
  }

  private known(model: string, names: string[]): Map<string, number> {
    const steps = this.seen.get(model);
    const out = new Map<string, number>();
    for (const n of names) if (steps?.has(n)) out.set(n, steps.get(n)!);
    return out;
  }

  /** Record an answer's steps; throw (or warn) if one is not past what was known at sending. */
  private saw(model: string, results: Record<string, StepResult>, known: Map<string, number>): void {
    const steps = this.seen.get(model) ?? new Map<string, number>();
    this.seen.set(model, steps);
    const regressions: Record<string, [number, number]> = {};
    for (const [n, r] of Object.entries(results)) {
      const before = known.get(n);
      if (before !== undefined && r.step <= before) regressions[n] = [r.step, before];
      if (n in regressions || r.step > (steps.get(n) ?? -1)) steps.set(n, r.step);
    }
    const names = Object.keys(regressions);
    if (!names.length) return;
    const lost = names.map((n) => `${JSON.stringify(n)} is at step ${regressions[n][0]} after step ${regressions[n][1]}`).join(", ");
    const message =
      `model ${JSON.stringify(model)} went back: ${lost} was seen by this client. Steps it acknowledged were lost ` +
      "(a server that acknowledged them from memory, with flush_ms durability, crashed; or the model was deleted " +
      "and created again). This step was applied to the state as it is now.";
    if (this.onStepBack === "warn") return warn(message, "StepWentBackWarning");
    throw new StepWentBack(message, { model, regressions, result: results });
  }

  /** Forget what was seen of a model (or of some of its parameters): they start over legitimately. */
  private forget(model: string, names?: string[]): void {
    if (names === undefined) this.seen.delete(model);
    else for (const n of names) this.seen.get(model)?.delete(n);
  }

  private async probe(path: string, signal?: AbortSignal): Promise<boolean> {
    try {
      return (await this.send({ method: "GET", path }, signal)).status === 200;
    } catch (e) {
      if (e instanceof TransportError) return false;
      throw e;
    }
  }

  private stepRequest(model: string, gradients: Record<string, Tensor>, returnParams: boolean, options: StepOptions): Req {
    const fields: Record<string, unknown> = { return_params: returnParams };
    if (options.expectedSteps !== undefined && options.expectedSteps !== null) {
      const e: Record<string, number> = {};
      for (const [n, s] of Object.entries(options.expectedSteps)) e[n] = asIndex(s, `expectedSteps[${JSON.stringify(n)}]`);
      fields.expected_steps = e;
    }
    if (options.workerId !== undefined && options.workerId !== null) fields.worker_id = asIndex(options.workerId, "workerId");
    if (options.baseStep !== undefined && options.baseStep !== null) fields.base_step = asIndex(options.baseStep, "baseStep");
    if (options.metrics !== undefined && options.metrics !== null) {
      const m: Record<string, number> = {};
      for (const [n, v] of Object.entries(options.metrics)) {
        if (typeof v !== "number" || !Number.isFinite(v)) throw new RangeError(`metrics[${JSON.stringify(n)}] must be finite, got ${v}`);
        m[n] = v;
      }
      fields.metrics = m;
    }
    const key = options.idempotencyKey;
    if (key !== undefined && key !== null && !KEY.test(key)) throw new RangeError("idempotencyKey must be 1 to 255 visible ASCII characters");
    const req = this.tensorRequest("POST", `${modelPath(model)}/step`, gradients, fields, "gradient", true);
    req.headers = { ...req.headers, "Idempotency-Key": key ?? crypto.randomUUID().replaceAll("-", "") };
    if (key === undefined || key === null) req.headers[FRESH_KEY] = "1";
    return req;
  }

  /**
   * Send a step until it has a final answer, re-sending the very same request (bytes and key): up to
   * `maxRetries` transient failures in a row, after Retry-After or a full-jitter backoff; a sync 202 is
   * re-sent until `syncWait` has passed since the first attempt (then StepTimeout).
   */
  private async postStep(model: string, gradients: Record<string, Tensor>, returnParams: boolean, options: StepOptions): Promise<Res> {
    let req = this.stepRequest(model, gradients, returnParams, options);
    const start = performance.now();
    let failures = 0;
    for (;;) {
      let res: Res;
      try {
        res = await this.send(req, options.signal);
      } catch (e) {
        if (!(e instanceof TransportError)) throw e;
        req = retryOf(req);
        if (failures >= this.maxRetries) throw e;
        await sleep(this.delay(failures, null), this.combined(options.signal));
        failures += 1;
        continue;
      }
      req = retryOf(req);
      if (res.status === 202) {
        failures = 0;
        const pending = this.parse(res, (b) => {
          if (!isObject(b) || b.status !== "pending" || !isObject(b.contributions)) throw new TypeError("not a pending answer");
          return { baseStep: expectInt(b.base_step, "base_step"), workers: expectInt(b.workers, "workers"), contributions: b.contributions as Record<string, number> };
        });
        const elapsed = (performance.now() - start) / 1000;
        if (elapsed >= this.syncWait) {
          const done = Object.entries(pending.contributions).map(([n, c]) => `${n}: ${c}/${pending.workers}`).join(", ");
          throw new StepTimeout(
            `the sync step from base_step ${pending.baseStep} was not complete after ${this.syncWait} s (contributions ${done}); POST ${res.url}`,
            { ...pending, method: "POST", url: res.url },
          );
        }
        const wait = Math.min(this.delay(0, parseRetryAfter(res.headers.get("retry-after"))), this.syncWait - elapsed);
        if (wait > 0) await sleep(wait, this.combined(options.signal));
        continue;
      }
      if (this.isTransient(res)) {
        if (failures >= this.maxRetries) throw this.error(res);
        await sleep(this.delay(failures, parseRetryAfter(res.headers.get("retry-after"))), this.combined(options.signal));
        failures += 1;
        continue;
      }
      return res;
    }
  }

  /** Seconds before the `retry`-th retry in a row: Retry-After (capped), else full-jitter backoff. */
  private delay(retry: number, retryAfter: number | null): number {
    if (retryAfter !== null) return Math.min(retryAfter, BACKOFF_CAP);
    return this.random() * Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** Math.min(retry, 64));
  }

  private isTransient(res: Res): boolean {
    if (res.status === 502 || res.status === 503 || res.status === 504) return true;
    return res.status === 409 && this.error(res).code === "idempotency-in-flight";
  }

  private tensorRequest(method: string, path: string, tensors: Record<string, Tensor>, fields: Record<string, unknown>, what: string, half: boolean): Req {
    for (const n of Object.keys(tensors)) segment(n, what);
    if (this.wire === "json") {
      const key = what === "gradient" ? "gradients" : "params";
      const encoded: Record<string, RawJSON> = {};
      for (const [n, t] of Object.entries(tensors)) encoded[n] = encodeTensorJSON(t, `${what} ${JSON.stringify(n)}`, half);
      return jsonRequest(method, path, { [key]: encoded, ...fields });
    }
    return {
      method,
      path,
      headers: { "Content-Type": SAFETENSORS, Accept: BINARY_ACCEPT },
      body: encodeSafetensors(tensors, fields, what, half),
    };
  }

  private combined(signal?: AbortSignal): AbortSignal | undefined {
    const signals = [signal, this.signal].filter((s): s is AbortSignal => s !== undefined);
    if (signals.length <= 1) return signals[0];
    return AbortSignal.any(signals);
  }

  /**
   * Send once; a GET that got no answer (not a timeout) is sent once more at once: a kept-alive
   * connection the server closed while it was idle fails that way, and a GET changes nothing.
   */
  private async send(req: Req, signal?: AbortSignal): Promise<Res> {
    try {
      return await this.sendOnce(req, signal);
    } catch (e) {
      if (req.method !== "GET" || !(e instanceof TransportError) || e instanceof RequestTimeout) throw e;
      return this.sendOnce(req, signal);
    }
  }

  private async sendOnce(req: Req, signal?: AbortSignal): Promise<Res> {
    const base = this.routes.url(req.path);
    let url = base;
    if (req.query && Object.keys(req.query).length) url += "?" + new URLSearchParams(req.query).toString();
    const headers: Record<string, string> = { Accept: JSON_ACCEPT, ...this.headers, ...(req.headers ?? {}) };
    const user = this.combined(signal);
    const timeoutSignal = this.timeout ? AbortSignal.timeout(this.timeout * 1000) : undefined;
    const signals = [user, timeoutSignal].filter((s): s is AbortSignal => s !== undefined);
    const combined = signals.length > 1 ? AbortSignal.any(signals) : signals[0];
    try {
      const response = await this.fetchImpl(url, { method: req.method, headers, body: req.body as BodyInit | undefined, signal: combined });
      const body = new Uint8Array(await response.arrayBuffer());
      this.routes.learn(req.path, response.headers);
      if (response.status === 503 && base !== this.baseUrl + req.path) this.routes.forget(req.path); // not serving: ask the base URL next
      return { status: response.status, headers: response.headers, body, method: req.method, url };
    } catch (e) {
      if (user?.aborted) throw user.reason ?? e;
      this.routes.forget(req.path); // no answer from there: ask the base URL next
      if (timeoutSignal?.aborted) {
        throw new RequestTimeout(`${req.method} ${url}: no answer within ${this.timeout} s`, { method: req.method, url, cause: e });
      }
      if (e instanceof MomentumError) throw e;
      const cause = (e as { cause?: { code?: string; message?: string } }).cause;
      const detail = cause?.code ?? cause?.message ?? String(e);
      throw new TransportError(`${req.method} ${url}: no answer (${detail})`, { method: req.method, url, cause: e });
    }
  }

  private error(res: Res): APIError {
    let problem: Record<string, unknown> = {};
    try {
      const parsed = JSON.parse(new TextDecoder().decode(res.body));
      if (isObject(parsed)) problem = parsed;
    } catch {
      problem = {};
    }
    return apiError(res.status, problem, { headers: res.headers, method: res.method, url: res.url });
  }

  private check(res: Res): void {
    if (res.status >= 400) throw this.error(res);
  }

  private unexpected(res: Res, message: string, cause?: unknown): UnexpectedResponse {
    return new UnexpectedResponse(`${res.method} ${res.url}: ${message}`, { status: res.status, method: res.method, url: res.url, cause });
  }

  private parse<T>(res: Res, parser: (body: unknown) => T): T {
    this.check(res);
    let body: unknown;
    try {
      body = JSON.parse(new TextDecoder().decode(res.body));
      return parser(body);
    } catch (e) {
      throw this.unexpected(res, `the answer is not what the API defines: ${e}`, e);
    }
  }

  private entries(res: Res): Record<string, Entry> {
    if (!isBinary(res)) {
      return this.parse(res, (b) => {
        const out: Record<string, Entry> = {};
        if (!isObject(b) || !isObject(b.params)) throw new TypeError("no params");
        for (const [n, p] of Object.entries(b.params)) {
          if (!isObject(p)) throw new TypeError(`params[${n}] is not an object`);
          const velocity = p.velocity;
          out[n] = { value: "data" in p ? decodeTensorJSON(p) : null, velocity: velocity ? decodeTensorJSON(velocity) : null, fields: p };
        }
        return out;
      });
    }
    this.check(res);
    try {
      const { tensors, metadata } = decodeSafetensors(res.body);
      if (!isObject(metadata.params)) throw new TypeError("no params in __metadata__");
      const out: Record<string, Entry> = {};
      for (const [n, p] of Object.entries(metadata.params)) {
        out[n] = { value: tensors[n] ?? null, velocity: tensors[`${n}@velocity`] ?? null, fields: p as Record<string, unknown> };
      }
      return out;
    } catch (e) {
      throw this.unexpected(res, String(e), e);
    }
  }
}

/** A warning: `process.emitWarning` in Node (a "warning" event named `name`), else `console.warn`. */
function warn(message: string, name: string): void {
  const p = (globalThis as { process?: { emitWarning?: (m: string, name: string) => void } }).process;
  if (p?.emitWarning) p.emitWarning(message, name);
  else console.warn(`${name}: ${message}`);
}

const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

/** What a requested config body sets differently from an existing model's config (the Python SDK's rules). */
function configDifferences(requested: Record<string, unknown>, existing: Record<string, unknown>): string[] {
  const out: string[] = [];
  const asked = { rule: "pytorch", ...(requested.optimizer as Record<string, unknown>) };
  const have = (existing.optimizer ?? {}) as Record<string, unknown>;
  for (const [k, v] of Object.entries(asked)) {
    if (!same(k in have ? have[k] : NEUTRAL[k], v)) out.push(`optimizer.${k}: asked ${JSON.stringify(v)}, the model has ${JSON.stringify(have[k])}`);
  }
  for (const [k, v] of Object.entries(have)) {
    if (k in NEUTRAL && !(k in asked) && !same(v, NEUTRAL[k])) {
      out.push(`optimizer.${k}: asked ${JSON.stringify(NEUTRAL[k])} (the default), the model has ${JSON.stringify(v)}`);
    }
  }
  const askedSchedule = (requested.schedule ?? { type: "constant" }) as Record<string, unknown>;
  const haveSchedule = (existing.schedule ?? { type: "constant" }) as Record<string, unknown>;
  if (Object.entries(askedSchedule).some(([k, v]) => !same(haveSchedule[k], v))) {
    out.push(`schedule: asked ${JSON.stringify(askedSchedule)}, the model has ${JSON.stringify(haveSchedule)}`);
  }
  for (const k of ["mode", "workers", "max_staleness"]) {
    const dflt = k === "mode" ? "async" : null;
    const a = requested[k] ?? dflt;
    const h = existing[k] ?? dflt;
    if (!same(a, h)) out.push(`${k}: asked ${JSON.stringify(a)}, the model has ${JSON.stringify(h)}`);
  }
  if ("durability" in requested && !same(requested.durability, existing.durability ?? "step")) {
    out.push(`durability: asked ${JSON.stringify(requested.durability)}, the model has ${JSON.stringify(existing.durability)}`);
  }
  return out;
}

function isBinary(res: Res): boolean {
  return (res.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase() === SAFETENSORS;
}

function retryOf(req: Req): Req {
  if (!req.headers || !(FRESH_KEY in req.headers)) return req;
  const headers = { ...req.headers };
  delete headers[FRESH_KEY];
  return { ...req, headers };
}

function jsonRequest(method: string, path: string, body: unknown, headers: Record<string, string> = {}): Req {
  return { method, path, body: stringify(body), headers: { "Content-Type": "application/json", ...headers } };
}

const HYPER: Record<string, string> = {
  lr: "lr", momentum: "momentum", dampening: "dampening", nesterov: "nesterov", weightDecay: "weight_decay", maximize: "maximize",
};

function hyperparameters(config: Record<string, unknown>, skipNeutral: boolean): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, api] of Object.entries(HYPER)) {
    const v = config[k];
    if (v === undefined || (skipNeutral && api in NEUTRAL && v === NEUTRAL[api])) continue;
    if (typeof v === "number" && !Number.isFinite(v)) throw new RangeError(`${k} must be finite, got ${v}`);
    out[api] = v;
  }
  return out;
}

function modeFields(config: { mode?: string; workers?: number; maxStaleness?: number }, body: Record<string, unknown>): void {
  if (config.mode !== undefined) body.mode = config.mode;
  if (config.workers !== undefined) body.workers = asIndex(config.workers, "workers");
  if (config.maxStaleness !== undefined) body.max_staleness = asIndex(config.maxStaleness, "maxStaleness");
}

function durabilityJSON(d: Durability): unknown {
  if (d === "step") return "step";
  if (d !== null && typeof d === "object" && Object.keys(d).length === 1 && "flushMs" in d) return { flush_ms: asIndex(d.flushMs, "durability.flushMs") };
  if (d !== null && typeof d === "object" && Object.keys(d).length === 1 && "replicas" in d) return { replicas: asIndex(d.replicas, "durability.replicas") };
  throw new RangeError(`durability must be "step", {flushMs: N} or {replicas: N}, got ${JSON.stringify(d)}`);
}

const CONFIG_KEYS = new Set([...Object.keys(HYPER), "rule", "schedule", "mode", "workers", "maxStaleness", "durability", "groups", "shards", "existOk", "signal"]);

function modelBody(config: ModelConfig): Record<string, unknown> {
  if (typeof config?.lr !== "number") throw new TypeError("lr is required");
  const unknown = Object.keys(config).filter((k) => !CONFIG_KEYS.has(k));
  if (unknown.length) throw new TypeError(`unknown model option(s) ${unknown.join(", ")}; valid: ${[...CONFIG_KEYS].join(", ")}`);
  // as the Python SDK: lr, momentum and rule always; the others when they differ from their neutral value
  const optimizer = hyperparameters({ momentum: 0, ...config } as unknown as Record<string, unknown>, true);
  optimizer.rule = config.rule ?? "pytorch";
  const body: Record<string, unknown> = { optimizer };
  if (config.schedule !== undefined) body.schedule = config.schedule;
  modeFields({ ...config, mode: config.mode === "async" ? undefined : config.mode }, body);
  if (config.durability !== undefined) body.durability = durabilityJSON(config.durability);
  if (config.groups !== undefined) body.groups = config.groups;
  if (config.shards !== undefined) body.shards = asIndex(config.shards, "shards");
  return body;
}

function updateBody(update: Omit<ModelUpdate, "signal">): Record<string, unknown> {
  const valid = new Set([...Object.keys(HYPER), "schedule", "mode", "workers", "maxStaleness", "durability", "groups"]);
  const unknown = Object.keys(update).filter((k) => !valid.has(k));
  if (unknown.length) throw new TypeError(`updateModel: unknown option(s) ${unknown.join(", ")}; valid: ${[...valid].join(", ")}`);
  const body: Record<string, unknown> = {};
  const optimizer = hyperparameters(update as Record<string, unknown>, false);
  if (Object.keys(optimizer).length) body.optimizer = optimizer;
  if (update.schedule !== undefined) body.schedule = update.schedule;
  modeFields(update, body);
  if (update.durability !== undefined) body.durability = durabilityJSON(update.durability);
  if (update.groups !== undefined) body.groups = update.groups;
  if (!Object.keys(body).length) {
    throw new TypeError("updateModel needs at least one hyperparameter, a schedule, mode, workers, maxStaleness, durability or groups");
  }
  return body;
}

function parseState(b: unknown): ParamState {
  if (!isObject(b)) throw new TypeError("not an object");
  const state: Record<string, Tensor> = {};
  for (const [k, t] of Object.entries(isObject(b.state) ? b.state : {})) state[k] = decodeTensorJSON(t);
  if (!state.velocity && isObject(b.velocity)) state.velocity = decodeTensorJSON(b.velocity);
  return { name: String(b.name), value: decodeTensorJSON(b), velocity: state.velocity ?? null, step: expectInt(b.step, "step"), state };
}


