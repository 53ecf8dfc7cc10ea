/**
 * Where to send a model's requests: the base URL, or (with `followOwner`) the replica that owns it.
 * The same rules as the Python SDK's `momentum_client._routing`.
 *
 * A server replica that forwards a request to the model's owner adds `Momentum-Owner: <url>` to the
 * answer. With `followOwner: true` a client remembers it, per model, and sends that model's next
 * requests there directly: one hop instead of two. When the owner changes, the replica it asks
 * forwards again and names the new owner; when the owner does not answer, or answers 503, the client
 * forgets it and goes back to the base URL (a step is retried with the same Idempotency-Key either way).
 *
 * Off by default: behind a load balancer the replicas' own URLs (`MOMENTUM_ADVERTISE_URL`) may not be
 * reachable from the workers.
 */

const MODEL_PATH = /^\/v1\/models\/([^/?]+)(?:\/|$)/;

/** Owners remembered at most; past it the map starts again (a client of more models asks the base URL). */
export const MAX_MODELS = 10_000;

export class OwnerRoutes {
  private readonly owners = new Map<string, string>();

  constructor(
    readonly baseUrl: string,
    readonly enabled: boolean,
  ) {}

  private static model(path: string): string | null {
    const match = MODEL_PATH.exec(path);
    return match === null ? null : match[1];
  }

  /** The URL (without its query) to send a request for `path` (percent-encoded, relative to the base URL) to. */
  url(path: string): string {
    if (this.enabled && this.owners.size > 0) {
      const model = OwnerRoutes.model(path);
      const owner = model === null ? undefined : this.owners.get(model);
      if (owner !== undefined) return owner + path;
    }
    return this.baseUrl + path;
  }

  /** An answer came for `path`: remember the owner it names (if any, and if it is a base URL). */
  learn(path: string, headers: Headers): void {
    if (!this.enabled) return;
    const named = headers.get("momentum-owner");
    const model = OwnerRoutes.model(path);
    if (named === null || model === null) return;
    const owner = named.replace(/\/+$/, "");
    let parsed: URL;
    try {
      parsed = new URL(owner);
    } catch {
      return; // not a URL: ignored
    }
    if ((parsed.protocol !== "http:" && parsed.protocol !== "https:") || !parsed.host) return;
    if (parsed.pathname !== "/" || parsed.search || parsed.hash || parsed.username || parsed.password) return;
    if (this.owners.size >= MAX_MODELS && !this.owners.has(model)) this.owners.clear();
    this.owners.set(model, `${parsed.protocol}//${parsed.host}`);
  }

  /** The owner remembered for `path`'s model did not answer: back to the base URL. */
  forget(path: string): void {
    const model = OwnerRoutes.model(path);
    if (model !== null) this.owners.delete(model);
  }
}
