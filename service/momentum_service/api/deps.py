"""FastAPI dependencies, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from ..engine import ParameterServer
from ..settings import Settings
from .codecs import Limits
from .schemas import MODEL_NAME_PATTERN, PARAM_NAME_PATTERN


# ``async`` so that FastAPI calls them on the event loop: a plain ``def`` dependency is run in
# a thread pool, a hand-off that cost 10-15% of a small step's server time.
async def get_server(request: Request) -> ParameterServer:
    server: ParameterServer = request.app.state.server
    return server


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_limits(request: Request) -> Limits:
    limits: Limits = request.app.state.limits
    return limits


ServerDep = Annotated[ParameterServer, Depends(get_server)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="Model name.")]
ParamPath = Annotated[str, Path(pattern=PARAM_NAME_PATTERN, description="Parameter name, e.g. layer1.0.weight.")]
