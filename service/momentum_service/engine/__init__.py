"""The engine: models served from memory by their owner, kept durably in a journal.

- :mod:`.server`: :class:`ParameterServer`, the operations, routed to the model's owner;
- :mod:`.cluster`: replicas and leases (which process owns which model);
- :mod:`.owner`: :class:`ModelOwner`, one model's step loop;
- :mod:`.state`, :mod:`.entries`, :mod:`.snapshots`, :mod:`.tensors`: the state, its changes as
  logged, and its snapshots;
- :mod:`.writer`: durability, group commit and snapshots on the way to the journal;
- :mod:`.idempotency`, :mod:`.modes`, :mod:`.sync`: exactly-once keys, mode checks, sync steps.
"""

from ..errors import NotOwner, OwnerLost
from .idempotency import Idempotency
from .owner import EngineOptions, ModelOwner
from .results import StepPending, StepResult
from .server import ParameterServer, Remote
from .state import ModelRecord, ModelState, ParamMeta, ParamRecord, ParamState
from .sync import mean_gradient
from .tensors import RawTensors, TensorSpec

__all__ = [
    "EngineOptions",
    "Idempotency",
    "ModelOwner",
    "ModelRecord",
    "ModelState",
    "NotOwner",
    "OwnerLost",
    "ParamMeta",
    "ParamRecord",
    "ParamState",
    "ParameterServer",
    "RawTensors",
    "Remote",
    "StepPending",
    "StepResult",
    "TensorSpec",
    "mean_gradient",
]
