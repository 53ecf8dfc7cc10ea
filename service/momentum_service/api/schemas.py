"""Request and response bodies of HTTP API v1 (pydantic; also the OpenAPI schemas)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StringConstraints, Tag
from pydantic.json_schema import SkipJsonSchema

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PARAM_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,255}$"

ParamName = Annotated[str, StringConstraints(pattern=PARAM_NAME_PATTERN)]
_NAME = PARAM_NAME_PATTERN[1:-1]
# ``?names=``: at least one parameter name, comma-separated (spaces and empty items are ignored).
NAMES_PATTERN = rf"^[ ,]*{_NAME} *(, *({_NAME} *)?)*$"
INCLUDE_PATTERN = r"^ *((state|velocity) *)?(, *((state|velocity) *)?)*$"
DType = Literal["float32", "float64"]


def _integral(value: Any) -> Any:
    """A number like ``2.0`` as the integer it is: JSON Schema's ``integer`` includes it (JSON has one
    number type, and some encoders write every number with a fraction)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# The integers of request bodies: strict (no strings, no booleans), but 2.0 is 2; at most 2**63 - 1
# (1e300 is an integer too, and one past 64 bits could not be written back in a response). The
# constraints come before the validator, so that the JSON Schema keeps them as minimum and maximum.
_INTEGRAL = BeforeValidator(_integral)
Int0 = Annotated[int, Field(ge=0, le=2**63 - 1), _INTEGRAL]
Int1 = Annotated[int, Field(ge=1, le=2**63 - 1), _INTEGRAL]
WorkerCount = Annotated[int, Field(ge=1, le=1024), _INTEGRAL]
Int31 = Annotated[int, Field(ge=0, le=2**31 - 1), _INTEGRAL]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Tensor(_Strict):
    """A tensor: ``data`` holds ``prod(shape)`` numbers in row-major order (``shape: []`` is a scalar)."""

    shape: list[Int0] = Field(examples=[[2, 2]])
    dtype: DType = Field(examples=["float32"])
    data: list[float] = Field(examples=[[0.1, 0.2, 0.3, 0.4]])


_LR = Field(ge=0, allow_inf_nan=False, examples=[0.01], description="Base learning rate (the schedule scales it).")


def _momentum(upper: float | None = None, description: str = "Momentum factor m.") -> Any:
    return Field(default=0.0, ge=0, le=upper, allow_inf_nan=False, examples=[0.9], description=description)


class PyTorchRule(_Strict):
    """`torch.optim.SGD` (the default rule), bitwise torch 2.13 on CPU. lr is outside the velocity.

    ```
    g = -grad if maximize else grad
    g = g + wd*p                                  (when wd != 0)
    b = g on the first update, else b = m*b + (1-d)*g   (when m != 0)
    g = g + m*b if nesterov else b                (when m != 0)
    p = p - lr*g
    ```
    """

    rule: Literal["pytorch"] = "pytorch"
    lr: float = _LR
    momentum: float = _momentum()
    dampening: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    nesterov: bool = Field(default=False, description="Needs momentum > 0 and dampening = 0.")
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    maximize: bool = False


class KerasRule(_Strict):
    """Keras 3 `SGD` (TensorFlow backend), bitwise in float32 and float64. lr is inside the velocity.

    ```
    w = w - w*wd*lr                   (weight decay, decoupled, applied first)
    v = m*v - lr*g                    (v starts at 0)
    w = w + v        nesterov: w = w + m*v - lr*g
    ```
    The textbook rule `v = beta*v + eta*g; theta = theta - v` gives the same numbers (its
    velocity is `-v`). Each operation rounds once; lr, m and wd pass through float32 as in Keras.
    """

    rule: Literal["keras"]
    lr: float = _LR
    momentum: float = _momentum(1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class TF1Rule(_Strict):
    """`tf.compat.v1.train.MomentumOptimizer`. lr is outside the velocity.

    ```
    accum = m*accum + g               (accum starts at 0)
    var = var - lr*accum      nesterov: var = var - lr*g - lr*m*accum
    ```
    """

    rule: Literal["tf1"]
    lr: float = _LR
    momentum: float = _momentum()
    nesterov: bool = False


class EMARule(_Strict):
    """Momentum as a moving average of past gradients (`optax.ema(m, debias=False)`). lr is outside.

    ```
    v = m*v + (1-m)*g                 (v starts at 0)
    p = p - lr*v
    ```
    """

    rule: Literal["ema"]
    lr: float = _LR
    momentum: float = _momentum(1.0, "The averaging factor (beta).")


class PreviousDeltaRule(_Strict):
    """Re-applies only the previous step; not true momentum. lr is inside the velocity.

    ```
    delta = lr*g
    p = p - delta - m*delta_prev      (delta_prev starts at 0)
    ```
    True momentum sums all past steps (a steady slope gives `lr*g/(1-m)` per step);
    this echoes only the last one (`lr*g*(1+m)` per step).
    """

    rule: Literal["previous_delta"]
    lr: float = _LR
    momentum: float = _momentum()


def _rule_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        rule = value.get("rule", "pytorch")
        return rule if isinstance(rule, str) else None
    return getattr(value, "rule", None)


Optimizer = Annotated[
    Annotated[PyTorchRule, Tag("pytorch")]
    | Annotated[KerasRule, Tag("keras")]
    | Annotated[TF1Rule, Tag("tf1")]
    | Annotated[EMARule, Tag("ema")]
    | Annotated[PreviousDeltaRule, Tag("previous_delta")],
    Discriminator(
        _rule_tag,
        custom_error_type="invalid_rule",
        custom_error_message=("rule must be one of pytorch, keras, tf1, ema, previous_delta (default pytorch)"),
    ),
]


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


# A PATCH field that may be left out (to keep the current value) but is never null: null passes
# validation so that the handler can answer 422 "null is not a value", and is not documented.
_Absent = SkipJsonSchema[None]


def _keep() -> Any:
    return Field(default=None, json_schema_extra=_drop_default)


_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class OptimizerPatch(_Strict):
    """Any subset of the model's rule's hyperparameters; the result is validated as a whole.

    `rule` may be given only with the model's current rule (a rule cannot be changed: 409).
    """

    rule: str | _Absent = _keep()
    lr: _NonNegative | _Absent = _keep()
    momentum: _NonNegative | _Absent = _keep()
    dampening: _NonNegative | _Absent = _keep()
    nesterov: bool | _Absent = _keep()
    weight_decay: _NonNegative | _Absent = _keep()
    maximize: bool | _Absent = _keep()


GROUP_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$"
GroupName = Annotated[str, StringConstraints(pattern=GROUP_NAME_PATTERN)]
_GroupEntry = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ParamGroupPatch(_Strict):
    """Change a parameter group: its `params` and/or some hyperparameters (of the model's rule)."""

    params: Annotated[list[_GroupEntry], Field(min_length=1, max_length=100_000)] | _Absent = _keep()
    lr: _NonNegative | _Absent = _keep()
    momentum: _NonNegative | _Absent = _keep()
    dampening: _NonNegative | _Absent = _keep()
    nesterov: bool | _Absent = _keep()
    weight_decay: _NonNegative | _Absent = _keep()
    maximize: bool | _Absent = _keep()


class ParamGroup(ParamGroupPatch):
    """Hyperparameters of their own for some parameters (torch's parameter groups).

    `params`: parameter names or fnmatch patterns (`*.bias`); a parameter takes the first group that
    names or matches it, else the model's `optimizer`. The hyperparameters given override the
    model's (the others follow the model's, PATCHes included); each must be one of the model's rule.
    The schedule scales each group's `lr` as torch's schedulers scale each group's.
    """

    name: GroupName | _Absent = Field(default=None, description='Default: the group\'s index (`"0"`, ...).')
    params: list[_GroupEntry] = Field(min_length=1, max_length=100_000, examples=[["*.bias", "bn1.weight"]])


_GROUPS_DOC = (
    "Parameter groups (as torch's): some parameters' own hyperparameters, e.g. "
    '`[{"params": ["*.bias"], "weight_decay": 0}]`.'
)


# Schedules: torch.optim.lr_scheduler's names and numbers (bitwise torch 2.13's lr).


class ConstantLR(_Strict):
    """The base lr at every step."""

    type: Literal["constant"]


class StepLR(_Strict):
    """`lr * gamma ** (k // step_size)` (torch's `StepLR`)."""

    type: Literal["step"]
    step_size: Int1
    gamma: float = Field(default=0.1, ge=0, allow_inf_nan=False)


class MultiStepLR(_Strict):
    """`lr * gamma ** (number of milestones <= k)` (torch's `MultiStepLR`)."""

    type: Literal["multistep"]
    milestones: list[Int1] = Field(max_length=1024)
    gamma: float = Field(default=0.1, ge=0, allow_inf_nan=False)


class ExponentialLR(_Strict):
    """`lr * gamma ** k` (torch's `ExponentialLR`)."""

    type: Literal["exponential"]
    gamma: float = Field(ge=0, allow_inf_nan=False)


class CosineAnnealingLR(_Strict):
    """`eta_min + (lr - eta_min) * (1 + cos(pi*k/T_max)) / 2` (torch's `CosineAnnealingLR`;
    like torch, it rises again after `T_max`)."""

    type: Literal["cosine"]
    T_max: Int1
    eta_min: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class LinearLR(_Strict):
    """`lr * factor`, the factor moving linearly from `start_factor` to `end_factor` over
    `total_iters` steps (torch's `LinearLR`)."""

    type: Literal["linear"]
    start_factor: float = Field(default=1.0 / 3, gt=0, le=1, allow_inf_nan=False)
    end_factor: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    total_iters: Int1 = 5


BasicSchedule = Annotated[
    ConstantLR | StepLR | MultiStepLR | ExponentialLR | CosineAnnealingLR | LinearLR,
    Field(discriminator="type"),
]


class SequentialLR(_Strict):
    """`schedulers[i]` runs from step `milestones[i-1]` (torch's `SequentialLR`: at a milestone
    the next scheduler starts from the base lr)."""

    type: Literal["sequential"]
    schedulers: list[BasicSchedule] = Field(min_length=1, max_length=16)
    milestones: list[Int1] = Field(max_length=15)


Schedule = Annotated[BasicSchedule | SequentialLR, Field(discriminator="type")]


ModeName = Literal["async", "sync", "bounded"]
_MODE_DOC = (
    "`async` (default): each push is applied on arrival. `sync`: each push carries `worker_id` and "
    "`base_step`; once `workers` distinct workers contributed to a step, their mean gradient is applied once "
    "(summed in worker-id order, then divided by `workers`: reproducible bit for bit). `bounded`: each push "
    "carries `base_step`, and a gradient more than `max_staleness` steps stale is refused (409)."
)


class FlushDurability(_Strict):
    """Acknowledged from the owner's memory; logged to Redis within `flush_ms` milliseconds."""

    flush_ms: Annotated[int, Field(ge=1, le=60_000), _INTEGRAL]


class ReplicatedDurability(_Strict):
    """Acknowledged once the step's log entry is in Redis and on `replicas` of its primary's replicas (WAIT)."""

    replicas: Annotated[int, Field(ge=1, le=8), _INTEGRAL]


Durability = Literal["step"] | FlushDurability | ReplicatedDurability
_DURABILITY_DOC = (
    '`"step"` (default): a step is acknowledged once its log entry is in Redis (with `appendfsync always`, an '
    'acknowledged step survives the crash of any process). `{"flush_ms": n}`: acknowledged from the owner\'s '
    "memory, logged to Redis within n ms: a crash of the owner loses at most the steps of the last n ms plus the "
    'lease period (the parameters\' steps then go back, which the SDK reports). `{"replicas": n}`: acknowledged '
    "once its log entry is in Redis and on at least n replicas of the Redis primary that holds it (WAIT), so a "
    "failover of that primary loses no acknowledged step (503 if the replicas do not confirm in time; retry with "
    "the same Idempotency-Key). The embedded store keeps everything in the process's memory either way (it "
    "refuses `replicas`)."
)


_SHARDS_DOC = (
    "Parameter shards (default 1): parameter `name` belongs to shard `xxh3_64(name) % shards`, and each shard "
    "is served by its own owner (on distinct replicas when there are enough), so a model too large for one "
    "process spreads over several. Async mode only. Fixed at creation (a PUT with another count is a 409; "
    "PATCH cannot change it). A step is applied at most once per Idempotency-Key on every shard, and a retry "
    "with the same key completes the shards a failed attempt missed; see the README."
)


class ModelPut(_Strict):
    """A model's config. The lr of a parameter's update k is `schedule(lr, k)`."""

    optimizer: Optimizer
    schedule: Schedule | None = Field(default=None, description="Default: constant.")
    mode: ModeName = Field(default="async", description=_MODE_DOC)
    workers: WorkerCount | None = Field(default=None, description="Workers per step (`sync` only).")
    max_staleness: Int31 | None = Field(
        default=None, description="Largest accepted staleness, in steps (`bounded` only)."
    )
    durability: Durability = Field(default="step", description=_DURABILITY_DOC)
    groups: list[ParamGroup] | None = Field(default=None, max_length=1024, description=_GROUPS_DOC)
    shards: Annotated[int, Field(ge=1, le=64), _INTEGRAL] | None = Field(default=None, description=_SHARDS_DOC)


def _groups_schema(schema: dict[str, Any]) -> None:
    _drop_default(schema)
    _by_name(schema)


class ModelPatch(_Strict):
    """Change some hyperparameters (`lr` rescales the schedule), the schedule and/or the mode.

    A new `mode` replaces the mode with its fields; without `mode`, `workers` or `max_staleness`
    change the current mode's. Leave a field out to keep it (null is refused).
    """

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    optimizer: OptimizerPatch | _Absent = _keep()
    schedule: Schedule | _Absent = _keep()
    mode: ModeName | _Absent = _keep()
    workers: WorkerCount | _Absent = _keep()
    max_staleness: Int31 | _Absent = _keep()
    durability: Durability | _Absent = _keep()
    groups: list[ParamGroup] | dict[GroupName, ParamGroupPatch] | _Absent = Field(
        default=None,
        json_schema_extra=_groups_schema,
        description="A list replaces the groups; an object `{group name: changes}` changes those groups.",
    )


def _by_name(schema: dict[str, Any]) -> None:
    """pydantic writes ``dict[ParamName, X]`` with ``patternProperties``, which leaves a key that does not
    match unconstrained; the server refuses such a key, so say that with ``propertyNames``."""
    for s in [schema, *schema.get("anyOf", [])]:
        if "patternProperties" in s:
            ((pattern, value),) = s.pop("patternProperties").items()
            s["propertyNames"] = {"pattern": pattern}
            s["additionalProperties"] = value


class ParamsPut(_Strict):
    params: dict[ParamName, Tensor] = Field(min_length=1, json_schema_extra=_by_name)


METRIC_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$"
MetricName = Annotated[str, StringConstraints(pattern=METRIC_NAME_PATTERN)]
MAX_METRICS = 32


class StepOptions(_Strict):
    """A step's options: the JSON body's fields besides ``gradients``, or the safetensors metadata."""

    return_params: bool = True
    expected_steps: dict[ParamName, Int0] | None = Field(
        default=None,
        description="Apply only if these parameters are at these steps (their versions); else 409 "
        "`step-mismatch` with `current_steps`, and nothing is applied.",
        json_schema_extra=_by_name,
    )
    worker_id: Int31 | None = Field(default=None, description="`sync` mode: this worker's id (required there).")
    base_step: Int0 | None = Field(
        default=None,
        description="The step the gradients were computed from: required in `sync` and `bounded` modes; in "
        "`async` mode it makes each result report its `staleness` (a `base_step` ahead of a parameter is a 409).",
    )
    metrics: dict[MetricName, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        default=None,
        max_length=MAX_METRICS,
        description='Training scalars of the worker (`{"loss": 0.31}`), kept with the step in the model\'s '
        "series (`GET /v1/models/{model}/metrics`); at most 32, finite.",
        json_schema_extra=_by_name,
    )


class StepRequest(StepOptions):
    gradients: dict[ParamName, Tensor] = Field(min_length=1, json_schema_extra=_by_name)


# Responses (documentation only: handlers encode them directly with orjson for speed).


class ParamSummary(BaseModel):
    shape: list[int]
    dtype: DType
    step: int = Field(description="Number of updates applied since the value was last set.")


class ShardOut(BaseModel):
    shard: int
    params: int = Field(description="The shard's parameters.")
    steps: int = Field(description="The highest step of the shard's parameters.")
    min_steps: int = Field(description="The lowest step of the shard's parameters.")


class ModelOut(BaseModel):
    name: str
    optimizer: Optimizer
    schedule: Schedule
    mode: ModeName
    workers: int | None = None
    max_staleness: int | None = None
    durability: Durability
    groups: list[ParamGroup] | None = Field(default=None, description="Only when the model has parameter groups.")
    params: dict[str, ParamSummary]
    shards: int | None = Field(default=None, description="Only for a sharded model: its parameter shards.")
    shard_steps: list[ShardOut] | None = Field(
        default=None, description="Only for a sharded model: each shard's parameters and steps."
    )
    consistent: bool | None = Field(
        default=None,
        description="Only for a sharded model: every shard that has parameters is at the same highest step (false "
        "while a step has reached some shards and not the others, e.g. one answered with a 503).",
    )


class ModelSummary(BaseModel):
    name: str
    rule: str
    mode: ModeName
    params: int = Field(description="Number of parameters.")
    steps: int = Field(description="The largest step count of its parameters (0 without parameters).")


class ModelList(BaseModel):
    models: list[ModelSummary]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class PointOut(BaseModel):
    id: int = Field(description="Grows by one per point (per model incarnation).")
    time: float = Field(description="When the push was applied (Unix seconds).")
    step: int = Field(description="The step the push brought its parameters to.")
    lr: float = Field(description="The learning rate its update used.")
    worker: int | None = Field(description="The push's worker_id, if it gave one.")
    staleness: int | None = Field(description="For a push with base_step: its staleness.")
    metrics: dict[str, float] = Field(description="The scalars the worker sent with the push (may be empty).")


class PointsOut(BaseModel):
    model: str
    points: list[PointOut] = Field(description="Oldest first.")
    next: int = Field(description="The last id returned (or `since`): poll with `since=next`.")


class ParamPutOut(ParamSummary):
    name: str


class ParamsPutEntry(ParamSummary):
    created: bool


class ParamsPutOut(BaseModel):
    params: dict[str, ParamsPutEntry]


class ParamOut(ParamSummary):
    name: str
    data: list[float]
    velocity: Tensor | None = Field(
        default=None,
        description="Only with ?include=velocity; null until the first update with momentum.",
    )
    state: dict[str, Tensor] | None = Field(
        default=None,
        description="Only with ?include=state: the rule's state buffers by name (`velocity` for the momentum "
        "rules); empty until the first update that creates them.",
    )


class ParamsOut(BaseModel):
    params: dict[str, ParamOut]


class StepParamOut(BaseModel):
    step: int = Field(description="The parameter's step count after this update.")
    lr: float = Field(description="The learning rate this update used (the schedule's value for it).")
    current_step: int | None = Field(
        default=None,
        description="Only in a replay (`Idempotent-Replayed: true`) of a step that later steps have moved on "
        "from: the parameter's current step; `data` is then its current value.",
    )
    staleness: int | None = Field(
        default=None,
        description="Only for a push with `base_step`: the updates other pushes applied to the parameter since "
        "`base_step`, before this one. Stale gradients act as extra momentum: see the README's advice on async "
        "training.",
    )
    shape: list[int] | None = None
    dtype: DType | None = None
    data: list[float] | None = None


class StepOut(BaseModel):
    params: dict[str, StepParamOut]


class StepPendingOut(BaseModel):
    """202: a sync push whose step still waits for other workers (re-send the push to wait again)."""

    status: Literal["pending"]
    base_step: int
    workers: int
    contributions: dict[str, int] = Field(description="Distinct workers that contributed so far, per parameter.")
    detail: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(examples=["urn:momentum-service:problem:not-found"])
    title: str
    status: int
    detail: str
    instance: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
    return {s: {"description": _PHRASES.get(s, "Error"), "content": content} for s in statuses}


_PHRASES = {s.value: s.phrase for s in HTTPStatus}
