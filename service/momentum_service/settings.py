"""All server settings, in one pydantic-settings class (environment prefix ``MOMENTUM_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration. Every field can be set as ``MOMENTUM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MOMENTUM_", env_file=None, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    redis_url: str | None = Field(
        default=None, description="redis:// or rediss:// URL; unset means the embedded in-memory store."
    )
    redis_cluster: bool = Field(
        default=False,
        description="redis_url names a node of a Redis Cluster (its credentials and TLS apply to every node): the "
        "models' keys spread over the cluster's slots (each model's keys in one slot).",
    )
    redis_cluster_nodes: str | None = Field(
        default=None,
        pattern=r"^\s*[^\s,]+:[0-9]+\s*(,\s*[^\s,]+:[0-9]+\s*)*$",
        description="More Redis Cluster nodes to read the cluster's map from at start, as host:port,host:port "
        "(any one that answers will do; with redis_cluster).",
    )
    redis_prefix: str = Field(default="momentum", pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    redis_timeout_s: float = Field(
        default=2.0, gt=0, description="Socket timeout of a Redis command; a request gets 503 within ~3x this."
    )
    buffer_pool_bytes: int = Field(
        default=256 << 20,
        ge=0,
        description="Memory kept for reuse by large step outputs and request bodies (recycled arrays avoid "
        "page faults on every step); 0 disables the pool.",
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Largest accepted request body (413).")
    max_tensor_elements: int = Field(default=1 << 25, gt=0, description="Largest tensor, in elements (413).")
    max_tensor_dims: int = Field(default=32, gt=0)
    idempotency_ttl_s: float = Field(
        default=86400.0, gt=0, description="How long a step's Idempotency-Key is remembered (default 24 h)."
    )
    idempotency_memory_keys: int = Field(
        default=100_000,
        gt=0,
        description="Idempotency keys an owner keeps in memory per model (with Redis; the rest are looked up "
        "there). The embedded store keeps every key for the TTL.",
    )
    sync_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a sync push waits for the other workers before a 202 (keep it below client timeouts).",
    )
    sync_ttl_s: float = Field(
        default=3600.0, gt=0, description="How long an unfinished sync step's gradients are kept."
    )
    advertise_url: str | None = Field(
        default=None,
        description="The URL other replicas reach this one at, to forward requests for the models it owns "
        "(default: http://<host>:<port>, with the machine's hostname for 0.0.0.0).",
    )
    lease_ms: int = Field(
        default=5000,
        ge=100,
        le=600_000,
        description="How long a model's owner holds it without renewing (renewed every third of it): when a "
        "replica dies, another takes its models over after this long.",
    )
    owner_idle_s: float = Field(
        default=600.0,
        gt=0,
        description="A model not used for this long is handed back by its owner (its log written, its lease "
        "released, its memory freed); the next request takes it again on any replica. Not with the embedded store.",
    )
    series_points: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Points of a model's training series kept (one per applied push, with the scalars its worker "
        "sent: GET /v1/models/{model}/metrics); the oldest are dropped.",
    )
    snapshot_log_ratio: float = Field(
        default=4.0,
        gt=0,
        description="A model's state is snapshotted (and its log dropped) once its log since the last snapshot "
        "exceeds this many times the state's size (and 1 MiB).",
    )
    flush_max_pending_bytes: int = Field(
        default=256 << 20,
        gt=0,
        description="A flush_ms model's log not yet written, beyond which steps wait for the flush (back-pressure).",
    )
    keys_file: str | None = Field(
        default=None, description="File of API keys (SHA-256 hashes and scopes, one per line); see auth.py."
    )
    api_keys: str | None = Field(default=None, description="Key lines inline, separated by newlines or ';'.")
    insecure: bool = Field(
        default=False, description="Run without API keys on a non-loopback address (refused otherwise)."
    )
    public_docs: bool = Field(default=False, description="Serve /docs and /openapi.json without a key.")
    public_metrics: bool = Field(
        default=False,
        description="Serve /metrics (Prometheus) without a key; otherwise it needs a key with a scope on every "
        "model (read:*, write:* or admin:*).",
    )
    metrics_max_models: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Distinct model names that get their own label in /metrics; the others are counted as "
        'model="_other" (bounds the exposition\'s size).',
    )
    max_concurrent_requests: int = Field(
        default=256, gt=0, description="Requests handled at once; beyond it, 503 with Retry-After."
    )
    max_concurrent_per_key: int = Field(
        default=64,
        gt=0,
        description="Requests of one API key in the server at once (reading their bodies or being handled); "
        "beyond it, 503 with Retry-After. With API keys only: one tenant cannot take every slot.",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a request body may take to arrive; beyond it, 408 and the connection is closed.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a request line and its headers may take to arrive (408)."
    )
    bodies_in_flight: int = Field(
        default=8,
        gt=0,
        description="Memory for request bodies being received, in multiples of max_body_bytes; beyond, 503.",
    )
    max_params_per_request: int = Field(default=10_000, gt=0, description="Tensors in one request (413).")
    max_json_depth: int = Field(default=32, gt=0, description="Nesting depth of a JSON body (422).")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json (one object per line, for log collectors)."
    )
    slow_step_ms: float = Field(
        default=1000.0, gt=0, description="A step whose server time exceeds this is logged (with its request id)."
    )
    access_log: bool = Field(
        default=False,
        description="Log every request (uvicorn's access log); off by default, as it costs time per step.",
    )

    @model_validator(mode="after")
    def _cluster_needs_redis(self) -> Settings:
        if (self.redis_cluster or self.redis_cluster_nodes) and not self.redis_url:
            raise ValueError(
                "MOMENTUM_REDIS_CLUSTER / MOMENTUM_REDIS_CLUSTER_NODES need MOMENTUM_REDIS_URL (a node of the cluster)"
            )
        if self.redis_cluster_nodes and not self.redis_cluster:
            raise ValueError("MOMENTUM_REDIS_CLUSTER_NODES is set but MOMENTUM_REDIS_CLUSTER is not true")
        return self
