"""gpubptt: batched vanilla RNNs and exact backpropagation through time, on NumPy or CuPy.

s_t = tanh(U x_t + W s_{t-1} [+ b])      ŷ_t = softmax(V s_t [+ c])      E = Σ_t −log ŷ_t[y_t]

>>> import numpy as np, gpubptt
>>> model = gpubptt.RNN(10, 32, 10, backend="numpy", seed=0)
>>> x = np.random.default_rng(0).integers(0, 10, size=(20, 4))   # (T, B) token ids
>>> loss, grads = model.loss_and_grads(x, x)
>>> sorted(grads)
['U', 'V', 'W', 's0']
"""

from __future__ import annotations

from .backend import Backend, available_backends, get_backend, to_numpy
from .config import ModelConfig
from .engine.pullback import PullbackError, VJPOutput
from .errors import (
    BackendMismatchError,
    BackendUnavailableError,
    InputError,
    InputTypeError,
    ShapeError,
)
from .gradcheck import GradcheckReport, gradcheck
from .model import RNN, RNNOutput

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "GradcheckReport",
    "InputError",
    "InputTypeError",
    "ModelConfig",
    "PullbackError",
    "RNNOutput",
    "ShapeError",
    "VJPOutput",
    "__version__",
    "available_backends",
    "get_backend",
    "gradcheck",
    "to_numpy",
]
