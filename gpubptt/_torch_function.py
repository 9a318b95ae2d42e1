"""The ``torch.autograd.Function`` under ``gpubptt.torch.Recurrent``: its forward is ``model.vjp`` on the
tensors (zero-copy views), its backward the pullback; and the tensor ↔ array crossings it shares with the module.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch

from .cells import cell_class
from .engine.pullback import PullbackError


@cache
def _carries_c(cell: str) -> bool:
    """Whether the cell's state is the tuple (h, c) (an extra state: torch's LSTM hx)."""
    return bool(cell_class(cell).extra_state)


def identity(params: Any) -> tuple:
    """What tells tensors apart for sharing: each one's object, storage, shape, strides, dtype and device (the
    model's views of them are made again only when it changes)."""
    return tuple((id(p), p.data_ptr(), p.shape, p.stride(), p.dtype, p.device) for p in params)


def _array(t: Any, xp: Any) -> Any:
    """The backend's array on a tensor's memory, without a copy: ``Tensor.numpy`` for CPU tensors (the same
    view as DLPack's, without its per-call protocol), DLPack for CUDA tensors (on the current stream)."""
    return t.detach().numpy() if t.device.type == "cpu" else xp.from_dlpack(t.detach())


def _tensor(a: Any) -> Any:
    """A torch tensor on an array's memory, without a copy: ``torch.from_numpy`` for NumPy, DLPack otherwise."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


def _placement(device: torch.device, current_stream: Any = None) -> tuple[int | None, int | None]:
    """(CUDA device index, stream pointer) where gpubptt runs tensors of ``device``: torch's current stream
    on that device (its pointer may be 0, the legacy default stream: still torch's, not CuPy's current one);
    (None, None) for CPU tensors. ``current_stream`` is ``torch.cuda.current_stream`` unless given."""
    if device.type != "cuda":
        return None, None
    index = torch.cuda.current_device() if device.index is None else device.index
    stream = (current_stream or torch.cuda.current_stream)(index)
    return index, int(stream.cuda_stream)


class _Pullback(torch.autograd.Function):
    """forward: ``model.vjp`` on the tensors (zero-copy views); backward: its pullback.

    ``apply((rec, key, model, lengths, ident, grad), x, h0, c0, *params)`` (grad: whether a backward can run
    at all): the Python objects travel as one argument, so torch walks as few arguments as it can; x, h0, c0
    and the Parameters are the inputs whose gradients torch asks for (``needs_input_grad[1:]``)."""

    @staticmethod
    def forward(ctx: Any, plan: tuple, x: Any, h0: Any, c0: Any, *params: Any) -> Any:
        rec, key, model, lengths, ident, grad = plan
        be, xp = model.backend, model.backend.xp
        lstm = _carries_c(rec.cell)
        device, stream = _placement(x.device)
        with be.external_stream(stream, device), model._lock:  # the shared biases are refreshed for this call
            rec._share(key, model, params, ident)
            n = model.num_states
            B, H = x.shape[1], rec.hidden_size
            s0 = None
            if h0 is not None or c0 is not None:
                zeros = torch.zeros(n, B, H, dtype=x.dtype, device=x.device)
                h = _array(zeros if h0 is None else h0, xp)
                s0 = (h, _array(zeros if c0 is None else c0, xp)) if lstm else h
                if n == 1:
                    s0 = tuple(a.reshape(B, H) for a in s0) if lstm else s0.reshape(B, H)
            out, pullback = model.vjp(_array(x, xp), s0, lengths=lengths, recompute=rec.recompute)
            if not grad:
                pullback.release()
        ctx.save_for_backward(x, h0, c0, *params)  # torch's own check that none of them changed in place since
        ctx.set_materialize_grads(False)  # an output the loss does not use comes back None, not a zeros tensor
        # the forward's weights by their storage: a ``p.data = …`` before backward (no version bump) leaves the saved
        # Parameter on new data, and torch differentiates at the forward's (the saved ones are unpacked in backward
        # for torch's check that none was changed in place)
        ctx.state = (pullback, rec, model, device, stream, n, B, H, key, ident, tuple(p.detach() for p in params))
        h, c = out.final_state if lstm else (out.final_state, None)
        c_n = None if c is None else _tensor(c.reshape(n, B, H))
        return _tensor(out.states), _tensor(h.reshape(n, B, H)), c_n

    @staticmethod
    def backward(ctx: Any, d_out: Any, d_hn: Any, d_cn: Any) -> Any:
        if not torch.is_grad_enabled():
            return _Pullback.pull(ctx, d_out, d_hn, d_cn)
        # create_graph=True: the pullback's gradients have no graph of their own; a gradient linear in nothing that
        # requires grad would come back constant and a penalty on it silently add nothing. They come back joined to
        # everything they depend on by a node that refuses to be differentiated (_Refuse).
        with torch.no_grad():
            grads = _Pullback.pull(ctx, d_out, d_hn, d_cn)[1:]
        return (None, *_Refuse.apply(len(grads), *grads, d_out, d_hn, d_cn, *ctx.saved_tensors))

    @staticmethod
    def pull(ctx: Any, d_out: Any, d_hn: Any, d_cn: Any) -> tuple:
        """The pullback's gradients as backward returns them: (None, dx, dh0, dc0, *dparams)."""
        pullback, rec, model, device, stream, n, B, H, key, ident, forwards = ctx.state
        _ = ctx.saved_tensors  # torch's error here if an input was modified in place since forward
        need = ctx.needs_input_grad  # (plan, x, h0, c0, *params)
        xp = model.backend.xp
        # the pullback reads model.params when it runs: point them back at this forward's weights, which a later
        # forward (another weight drawn, a Parameter replaced) may have swapped out
        with model.backend.external_stream(stream, device), model._lock:
            # the forward's storage (detached aliases, under the forward's identity: nothing is made again where the
            # model still views it), whatever a saved-tensors hook gave back or a ``p.data = …`` has put in place since
            rec._share(key, model, forwards, ident)
            d_states = None if d_out is None else _array(d_out.contiguous(), xp)  # None: zero (only h_n in the loss)
            d_final = None if d_hn is None else _final(d_hn, xp, n, B, H)
            if _carries_c(rec.cell):
                d_final = None if d_final is None and d_cn is None else (d_final, _final(d_cn, xp, n, B, H))
            try:
                g = pullback(d_states, d_final, want_dx=need[1])
            except PullbackError:  # worded for a torch user: there is no model.vjp to call in their code
                raise PullbackError(
                    "a gpubptt.torch.Recurrent forward allows one backward pass (its pullback consumes the forward's "
                    "buffers): a second one through the same graph (retain_graph=True, torch.autograd.gradcheck, "
                    "torch.autograd.functional.jacobian) needs the forward run again (gpubptt.gradcheck checks an "
                    "RNN built from the same weights: RNN.from_torch)"
                ) from None
            dx = _tensor(g["x"]) if need[1] else None
            dh0 = _tensor(g["s0"].reshape(n, B, H)) if need[2] else None
            dc0 = _tensor(g["c0"].reshape(n, B, H)) if need[3] else None
            dparams = []
            for (name, b_hn, copy), want in zip(rec._grad_plan, need[4:], strict=True):
                if not want:
                    dparams.append(None)
                    continue
                a = g[name]
                if copy:
                    a = a.copy()
                    if b_hn is not None:
                        a[2 * H :] = g[b_hn]
                dparams.append(_tensor(xp.ascontiguousarray(a)))
        return (None, dx, dh0, dc0, *dparams)


class _Refuse(torch.autograd.Function):
    """``apply(n, *grads, *depends)``: the n gradients as they are, joined to ``depends`` (the forward's inputs and
    the incoming gradients) so that a loss on them requires grad as torch's own modules' would; differentiating it
    (a gradient penalty, a Hessian-vector product) raises PullbackError rather than leave its terms out."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Any) -> Any:
        return tensors[:n]

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise PullbackError(
            "Recurrent's gradients are not themselves differentiable: no double backward (a gradient penalty, a "
            "Hessian-vector product: backward through gradients taken with create_graph=True) through "
            "gpubptt.torch.Recurrent"
        )


def _final(d: Any, xp: Any, n: int, B: int, H: int) -> Any:
    """∂E/∂h_n (or c_n) (L·dirs, B, H) as the pullback takes it: (B, H) for one recurrence, as s0 went in."""
    if d is None:
        return None
    a = _array(d.contiguous(), xp)
    return a.reshape(B, H) if n == 1 else a.reshape(n, B, H)
