"""Pure numeric kernels: numpy in, numpy out, no I/O."""

from .fma import fma
from .sgd import SGDConfig, sgd_update

__all__ = ["SGDConfig", "fma", "sgd_update"]
