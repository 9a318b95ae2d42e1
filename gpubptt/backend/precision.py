"""GEMM precision: "fp32", "tf32" or "bf16", and the exact rounding that defines the last two.

A model's ``precision`` is a runtime choice like its backend, not part of its architecture: the
parameters stay float32, and only the two operands of every GEMM (``Backend.matmul``) are rounded;
products are accumulated in float32, and everything elementwise (gates, cell state c, softmax, the
optimizer's master weights) stays float32. With p explicit mantissa bits kept out of float32's 23,
and u the float32 bit pattern of x (an unsigned 32-bit integer), round to nearest, ties to even:

    r(x) = bits⁻¹( (u + 2^(d−1) − 1 + ((u >> d) & 1)) & ~(2^d − 1) ),   d = 23 − p

    tf32: p = 10 (d = 13)     bf16: p = 7 (d = 16; the result's top 16 bits are the bfloat16)

NaN stays NaN (quiet); ±inf stays ±inf; a finite x whose rounding carries past the largest finite
value becomes ±inf (bf16: |x| ≥ 0x7F7F8000 as bits, i.e. ≥ 3.3961e38); subnormals round on the same
grid. The relative error of one operand is at most 2^−(p+1): 2^−11 ≈ 4.9e-4 (tf32), 2^−8 ≈ 3.9e-3 (bf16).

On NumPy the rounding is emulated exactly (integer operations on float32 views, into scratch
buffers kept per thread and reused, never per call), then the float32 GEMM runs: this is the
reference that a device's tensor-core GEMMs are compared with. On CuPy, tf32 is cuBLAS's compute
type ``CUBLAS_COMPUTE_32F_FAST_TF32`` (the hardware may truncate instead of rounding: at most
2^−10 per operand) and bf16 is an elementwise kernel (``BF16_ROUND_BODY``) into uint16 buffers and
``cublasGemmEx`` with bfloat16 inputs, float32 output and float32 compute.

    >>> import numpy as np
    >>> x = np.array([1 + 2**-8, 1 + 3 * 2**-8, np.float32(3.4028235e38)], dtype=np.float32)
    >>> round_bf16(x, np.empty_like(x)).tolist()   # ties to even: 1 and 1 + 2^-6; max finite → inf
    [1.0, 1.015625, inf]
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "BF16_ROUND_BODY",
    "PRECISIONS",
    "Rounded",
    "Scratch",
    "check_precision",
    "round_bf16",
    "round_bits",
    "round_tf32",
    "rounded_operands",
]

#: The values of a model's ``precision``: float32 GEMMs (the default), TF32 or bfloat16 operands.
PRECISIONS = ("fp32", "tf32", "bf16")
#: Bits of float32's mantissa each precision drops (23 − its explicit mantissa bits).
DROPPED_BITS = {"tf32": 13, "bf16": 16}

#: CUDA body of the CuPy kernel ``float32 x → uint16 y`` that writes bfloat16(x) by round to nearest even
#: (the formula above with d = 16; ``keep`` marks NaN, which stays a quiet NaN). Written so that the
#: tests can read it as integer arithmetic on NumPy uint32 arrays.
BF16_ROUND_BODY = """
const unsigned int u = __float_as_uint(x);
const unsigned int keep = (u & 0x7FFFFFFFu) > 0x7F800000u;
const unsigned int r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
y = (unsigned short)(keep * ((u >> 16) | 0x40u) + (1u - keep) * r);
"""


def check_precision(value: Any, dtype: Any = np.float32) -> str:
    """The precision ``value`` ("fp32", "tf32" or "bf16"), or InputError naming the three; tf32 and bf16
    only for float32 models (a float64 model's GEMMs are float64: there is nothing to round to)."""
    if not isinstance(value, str) or value.lower() not in PRECISIONS:
        raise InputError(f"unknown precision {value!r}; expected one of {', '.join(PRECISIONS)}")
    value = value.lower()
    if value != "fp32" and np.dtype(dtype) != np.float32:
        raise InputError(
            f"precision={value!r} rounds float32 GEMM operands; a {np.dtype(dtype).name} model runs "
            f"precision='fp32' only (build it with dtype='float32')"
        )
    return value


def round_bits(x: Any, out: Any, dropped: int, *, mask: Any = None) -> Any:
    """out = x rounded to float32 with its last ``dropped`` mantissa bits zero (nearest, ties to even).

    x any float32 array or view (m, k), transposed views included; out a float32 array of the same shape
    that does not overlap x; mask an optional bool array of that shape used as scratch (else one is made).
    NaN stays a quiet NaN.
    """
    if x.dtype != np.float32 or out.dtype != np.float32 or x.shape != out.shape:
        raise InputError(
            f"rounding needs float32 arrays of one shape; got {x.dtype} {x.shape} into {out.dtype} {out.shape}"
        )
    u, o = x.view(np.uint32), out.view(np.uint32)  # same itemsize: a view for any strides
    if mask is None:
        mask = np.empty(x.shape, dtype=bool)
    np.isnan(x, out=mask)
    low = np.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF)  # keeps sign, exponent and the kept mantissa bits
    np.right_shift(u, np.uint32(dropped), out=o)
    np.bitwise_and(o, np.uint32(1), out=o)  # the lowest kept bit: ties go to the even neighbour
    o += np.uint32((1 << (dropped - 1)) - 1)
    o += u  # a NaN's bits may carry into the sign here: replaced below
    o &= low
    if mask.any():  # rare: a NaN operand keeps its sign and payload's top bits, made quiet
        np.bitwise_or(u, np.uint32(0x00400000), out=o, where=mask)
        np.bitwise_and(o, low, out=o, where=mask)
    return out


def round_tf32(x: Any, out: Any) -> Any:
    """out = x rounded to TF32 (10 explicit mantissa bits, nearest even), as float32; x, out float32, same shape."""
    return round_bits(x, out, DROPPED_BITS["tf32"])


def round_bf16(x: Any, out: Any) -> Any:
    """out = x rounded to bfloat16 (7 explicit mantissa bits, nearest even), as float32; x, out float32, same shape."""
    return round_bits(x, out, DROPPED_BITS["bf16"])


class Scratch:
    """Buffers for rounded GEMM operands, per thread and operand slot, reused from call to call.

    ``get(slot, shape, dtype, xp)`` returns a C-ordered array of ``shape`` viewed from the thread's
    largest buffer for that slot; a buffer too small is replaced by one twice the size, so a steady loop
    allocates nothing. On the device the old one is kept (a captured CUDA graph may still read it), and each
    is allocated outside CuPy's memory pools (a graph's warm-up runs under its private pool, which is freed
    with the graph while this buffer lives on for later graphs); on the host it is let go.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, slot: str, shape: tuple[int, ...], dtype: Any, xp: Any) -> Any:
        """A C-ordered (shape) array of ``dtype`` for operand ``slot`` ("a", "b", "mask_a", …) of this thread."""
        pools = self._local.__dict__.setdefault("pools", {})
        key = (slot, np.dtype(dtype).str)
        held = pools.setdefault(key, [])
        n = int(np.prod(shape, dtype=np.int64))
        if not held or held[-1].size < n:
            size = max(n, 2 * held[-1].size if held else n)
            if xp is np:
                held.clear()  # no graph on the host: nothing else reads an outgrown buffer
                held.append(np.empty(size, dtype=dtype))
            else:  # memory of its own, outside any pool: a graph's private pool is freed with its graph
                with xp.cuda.using_allocator():
                    held.append(xp.empty(size, dtype=dtype))
        return held[-1][:n].reshape(shape)


class Rounded:
    """A GEMM operand b rounded once (``r``), for many GEMMs at one precision: what ``NumpyBackend.pack``
    returns under tf32/bf16, so that a step loop rounds its weight once per call, not once per step."""

    def __init__(self, b: Any, precision: str) -> None:
        self.b, self.precision = b, precision
        self.r = np.empty(b.shape, np.float32)
        round_bits(b, self.r, DROPPED_BITS[precision])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.b.shape


def rounded_operands(scratch: Scratch, a: Any, b: Any, precision: str) -> tuple[Any, Any]:
    """(r(a), r(b)) in this thread's scratch buffers (NumPy): a (m, k), b (k, n) float32, any strides; b may
    be a ``Rounded`` of this precision (read as it is)."""
    dropped = DROPPED_BITS[precision]
    out = []
    for slot, x in (("a", a), ("b", b)):
        if type(x) is Rounded and x.precision == precision:
            out.append(x.r)
            continue
        x = x.b if type(x) is Rounded else x
        r = scratch.get(slot, x.shape, np.float32, np)
        round_bits(x, r, dropped, mask=scratch.get("mask_" + slot, x.shape, bool, np))
        out.append(r)
    return out[0], out[1]
