"""Request and response bodies of HTTP API v1 (pydantic; also the OpenAPI schemas)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PARAM_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,255}$"

ParamName = Annotated[str, StringConstraints(pattern=PARAM_NAME_PATTERN)]
DType = Literal["float32", "float64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Tensor(_Strict):
    """A tensor: ``data`` holds ``prod(shape)`` numbers in row-major order (``shape: []`` is a scalar)."""

    shape: list[Annotated[int, Field(ge=0)]] = Field(examples=[[2, 2]])
    dtype: DType = Field(examples=["float32"])
    data: list[float] = Field(examples=[[0.1, 0.2, 0.3, 0.4]])


class Optimizer(_Strict):
    """Hyperparameters of torch.optim.SGD's momentum rule."""

    lr: float = Field(ge=0, allow_inf_nan=False, examples=[0.01])
    momentum: float = Field(default=0.0, ge=0, allow_inf_nan=False, examples=[0.9])
    dampening: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    maximize: bool = False


class OptimizerPatch(_Strict):
    """Any subset of the hyperparameters; the result is validated as a whole."""

    lr: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    momentum: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    dampening: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    nesterov: bool | None = None
    weight_decay: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    maximize: bool | None = None


class ModelPut(_Strict):
    optimizer: Optimizer


class ModelPatch(_Strict):
    optimizer: OptimizerPatch


class ParamsPut(_Strict):
    params: dict[ParamName, Tensor] = Field(min_length=1)


class StepRequest(_Strict):
    gradients: dict[ParamName, Tensor] = Field(min_length=1)
    return_params: bool = True


# Responses (documentation only: handlers encode them directly with orjson for speed).


class ParamSummary(BaseModel):
    shape: list[int]
    dtype: DType
    step: int = Field(description="Number of updates applied since the value was last set.")


class ModelOut(BaseModel):
    name: str
    optimizer: Optimizer
    params: dict[str, ParamSummary]


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


class ParamsOut(BaseModel):
    params: dict[str, ParamOut]


class StepParamOut(BaseModel):
    step: int
    shape: list[int] | None = None
    dtype: DType | None = None
    data: list[float] | None = None


class StepOut(BaseModel):
    params: dict[str, StepParamOut]


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
    return {s: {"model": ProblemDetails, "content": {"application/problem+json": {}}} for s in statuses}
