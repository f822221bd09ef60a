"""cugrad: neural-network layers trained with hand-written CUDA kernels, and the same API
on the CPU through NumPy.

    import cugrad
    import cugrad.functional as F
    from cugrad import nn, optim
"""

from . import functional, nn, optim
from ._arrays import asarray, to_numpy
from ._backend import BackendUnavailableError, cuda_available, cuda_unavailable_reason
from .gradcheck import GradcheckError, gradcheck, jacobian
from .graph import TrainStepGraph, capture_train_step
from .profiler import profile

__version__ = "0.1.0"

__all__ = ["functional", "nn", "optim", "asarray", "to_numpy", "cuda_available",
           "cuda_unavailable_reason", "BackendUnavailableError", "gradcheck", "jacobian",
           "GradcheckError", "profile", "capture_train_step", "TrainStepGraph"]
