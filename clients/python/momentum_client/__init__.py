"""Python SDK for momentum-service: ``torch.optim.SGD``'s momentum rule as an HTTP parameter server.

::

    import numpy as np
    import momentum_client as mc

    with mc.Client("http://localhost:8000") as client:
        client.create_model("mlp", lr=0.01, momentum=0.9)
        client.init_params("mlp", {"w": np.zeros((4, 3), np.float32)}, exist_ok=True)
        params = client.step("mlp", {"w": np.ones((4, 3), np.float32)})

:class:`AsyncClient` has the same methods, as coroutines. Errors are documented in one place,
the module docstring of ``momentum_client._exceptions``.
"""

from ._async_client import AsyncClient
from ._client import Client
from ._exceptions import (
    APIError,
    Conflict,
    Forbidden,
    InvalidRequest,
    ModelConfigWarning,
    ModelExists,
    MomentumError,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    StepTimeout,
    StepWentBack,
    StepWentBackWarning,
    TensorMismatch,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
)
from ._models import RULES, ModelInfo, ModelSummary, OptimizerConfig, OptimizerUpdate, ParamInfo, ParamState, StepResult
from ._steps import StepOptions
from ._version import __version__

__all__ = [
    "__version__",
    # clients
    "Client",
    "AsyncClient",
    # results
    "ModelInfo",
    "ModelSummary",
    "OptimizerConfig",
    "OptimizerUpdate",
    "StepOptions",
    "ParamInfo",
    "ParamState",
    "StepResult",
    "RULES",
    # exceptions
    "MomentumError",
    "TransportError",
    "RequestTimeout",
    "StepTimeout",
    "UnexpectedResponse",
    "StepWentBack",
    "StepWentBackWarning",
    "APIError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "TensorMismatch",
    "PreconditionFailed",
    "ModelExists",
    "ModelConfigWarning",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "ServerError",
    "ServiceUnavailable",
]

# Present public names as momentum_client.X rather than momentum_client._module.X (as httpx does).
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
