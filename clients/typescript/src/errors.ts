/**
 * Every error the client throws, in one tree (the Python SDK's, `momentum_client._exceptions`):
 *
 *     MomentumError                 base class
 *     ├── TransportError            no HTTP response (connection refused/reset, DNS, TLS, ...)
 *     │   └── RequestTimeout        the client's `timeout` passed
 *     ├── StepTimeout               a sync-mode step still waits after `syncWait` (baseStep, workers, contributions)
 *     ├── UnexpectedResponse        a success answer the client cannot interpret
 *     ├── StepWentBack              a step was applied, but a parameter's step is not past one this
 *     │                             client saw before: acknowledged steps were lost (regressions, result)
 *     └── APIError                  an error status (4xx/5xx); `code` is the problem slug
 *         ├── InvalidRequest        400, 422 (`errors`)
 *         ├── Unauthorized          401
 *         ├── Forbidden             403 (`required`)
 *         ├── NotFound              404
 *         ├── Conflict              409 (`currentSteps`)
 *         │   ├── TensorMismatch    409 `tensor-mismatch` (`mismatches`)
 *         │   └── PreconditionFailed 412 (`existing`)
 *         │       └── ModelExists   412 `model-exists` (`existingConfig`)
 *         ├── PayloadTooLarge       413
 *         ├── UnsupportedMediaType  415
 *         └── ServerError           any other 5xx
 *             └── ServiceUnavailable 503 (`retryAfter`)
 *
 * An abort by the caller's own `signal` is not wrapped: its `AbortError` (or the signal's reason) is thrown.
 */

export const PROBLEM_TYPE_PREFIX = "urn:momentum-service:problem:";

export type Problem = Record<string, unknown>;

export class MomentumError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class TransportError extends MomentumError {
  readonly method: string;
  readonly url: string;
  constructor(message: string, init: { method: string; url: string; cause?: unknown }) {
    super(message, { cause: init.cause });
    this.method = init.method;
    this.url = init.url;
  }
}

export class RequestTimeout extends TransportError {}

export class StepTimeout extends MomentumError {
  readonly baseStep: number;
  readonly workers: number;
  readonly contributions: Record<string, number>;
  readonly method: string;
  readonly url: string;
  constructor(
    message: string,
    init: { baseStep: number; workers: number; contributions: Record<string, number>; method?: string; url?: string },
  ) {
    super(message);
    this.baseStep = init.baseStep;
    this.workers = init.workers;
    this.contributions = { ...init.contributions };
    this.method = init.method ?? "";
    this.url = init.url ?? "";
  }
}

export class UnexpectedResponse extends MomentumError {
  readonly status: number;
  readonly method: string;
  readonly url: string;
  constructor(message: string, init: { status: number; method: string; url: string; cause?: unknown }) {
    super(message, { cause: init.cause });
    this.status = init.status;
    this.method = init.method;
    this.url = init.url;
  }
}

/**
 * A step was applied, but a parameter's step count is not past one this client had seen: steps it
 * was told of were lost (a `flush_ms` model's owner crashed, or the model was deleted and created
 * again by someone else). `regressions` is `{name: [step now, highest seen before]}`; `result` is
 * the step's results (`{name: StepResult}`, as `stepResults` returns them); the step was applied once.
 */
export class StepWentBack extends MomentumError {
  readonly model: string;
  readonly regressions: Record<string, [number, number]>;
  readonly result: unknown;
  constructor(message: string, init: { model: string; regressions: Record<string, [number, number]>; result: unknown }) {
    super(message);
    this.model = init.model;
    this.regressions = { ...init.regressions };
    this.result = init.result;
  }
}

function str(value: unknown): string | null {
  return typeof value === "string" ? value : null;
}

const PHRASES: Record<number, string> = {
  400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
  408: "Request Timeout", 409: "Conflict", 412: "Precondition Failed", 413: "Content Too Large",
  415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
};

export class APIError extends MomentumError {
  readonly status: number;
  readonly problem: Problem;
  readonly type: string | null;
  readonly title: string | null;
  readonly detail: string | null;
  readonly instance: string | null;
  readonly headers: Headers;
  readonly method: string;
  readonly url: string;
  constructor(status: number, problem: Problem, init: { headers?: Headers; method?: string; url?: string } = {}) {
    super("");
    this.status = status;
    this.problem = { ...problem };
    this.type = str(problem.type);
    this.title = str(problem.title);
    this.detail = str(problem.detail);
    this.instance = str(problem.instance);
    this.headers = init.headers ?? new Headers();
    this.method = init.method ?? "";
    this.url = init.url ?? "";
    this.message = this.describe();
  }

  /** The problem type's slug (`"step-mismatch"`), or null when the type is not one of this API's. */
  get code(): string | null {
    return this.type !== null && this.type.startsWith(PROBLEM_TYPE_PREFIX)
      ? this.type.slice(PROBLEM_TYPE_PREFIX.length)
      : null;
  }

  /** Seconds to wait, from the `Retry-After` header (delay or HTTP date); null if absent or invalid. */
  get retryAfter(): number | null {
    return parseRetryAfter(this.headers.get("retry-after"));
  }

  protected describe(): string {
    let text = `${this.status} ${this.title ?? PHRASES[this.status] ?? "Error"}`;
    if (this.detail) text += `: ${this.detail}`;
    if (this.method && this.url) text += ` (${this.method} ${this.url})`;
    return text;
  }
}

export class InvalidRequest extends APIError {
  /** The `errors` member: `[{loc, msg}]` (may be empty). */
  get errors(): Array<{ loc: unknown[]; msg: string }> {
    const e = this.problem.errors;
    return Array.isArray(e) ? e.filter((x) => x !== null && typeof x === "object") : [];
  }
  protected override describe(): string {
    let text = super.describe();
    const errors = this.errors;
    const shown = errors.slice(0, 3).map((e) => `${(e.loc ?? []).join(".")}: ${e.msg}`);
    if (shown.length) {
      text += "; " + shown.join("; ");
      if (errors.length > 3) text += `; ... (${errors.length - 3} more)`;
    }
    return text;
  }
}

export class Unauthorized extends APIError {}

export class Forbidden extends APIError {
  get required(): string | null {
    return str(this.problem.required);
  }
}

export class NotFound extends APIError {}

export class Conflict extends APIError {
  /** The `current_steps` member: `{parameter: step}` (`{}` when absent). */
  get currentSteps(): Record<string, number> {
    const steps = this.problem.current_steps;
    const out: Record<string, number> = {};
    if (steps !== null && typeof steps === "object" && !Array.isArray(steps)) {
      for (const [n, s] of Object.entries(steps)) if (Number.isInteger(s)) out[n] = s as number;
    }
    return out;
  }
}

export class TensorMismatch extends Conflict {
  get mismatches(): Record<string, { expected: { shape: number[]; dtype: string }; got: { shape: number[]; dtype: string } }> {
    const raw = this.problem.mismatches;
    return raw !== null && typeof raw === "object" && !Array.isArray(raw) ? (raw as never) : {};
  }
}

export class PreconditionFailed extends Conflict {
  /** The `existing` member: the names of the parameters that already exist. */
  get existing(): string[] {
    const e = this.problem.existing;
    return Array.isArray(e) ? e.filter((n): n is string => typeof n === "string") : [];
  }
}

export class ModelExists extends PreconditionFailed {
  /** The existing model's config, as the server holds it. */
  get existingConfig(): Record<string, unknown> {
    const e = this.problem.existing;
    return e !== null && typeof e === "object" && !Array.isArray(e) ? (e as Record<string, unknown>) : {};
  }
}

export class PayloadTooLarge extends APIError {}
export class UnsupportedMediaType extends APIError {}
export class ServerError extends APIError {}
export class ServiceUnavailable extends ServerError {}

const BY_STATUS: Record<number, typeof APIError> = {
  400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 412: PreconditionFailed,
  413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidRequest, 503: ServiceUnavailable,
};

const BY_CODE: Record<string, typeof APIError> = {
  "409 tensor-mismatch": TensorMismatch,
  "412 model-exists": ModelExists,
};

/** The error for an error answer: its class chosen by status, refined by two problem codes. */
export function apiError(
  status: number,
  problem: Problem,
  init: { headers?: Headers; method?: string; url?: string } = {},
): APIError {
  const type = typeof problem.type === "string" ? problem.type : "";
  const slug = type.startsWith(PROBLEM_TYPE_PREFIX) ? type.slice(PROBLEM_TYPE_PREFIX.length) : type;
  const cls = BY_CODE[`${status} ${slug}`] ?? BY_STATUS[status] ?? (status >= 500 && status <= 599 ? ServerError : APIError);
  return new cls(status, problem, init);
}

/** A `Retry-After` value in seconds (delay or HTTP date); null if absent or invalid. */
export function parseRetryAfter(value: string | null | undefined): number | null {
  if (value === null || value === undefined) return null;
  const v = value.trim();
  if (/^[0-9]+(\.[0-9]+)?$/.test(v)) {
    const seconds = Number(v);
    return Number.isFinite(seconds) ? seconds : null;
  }
  const when = Date.parse(v);
  if (Number.isNaN(when)) return null;
  return Math.max(0, (when - Date.now()) / 1000);
}
