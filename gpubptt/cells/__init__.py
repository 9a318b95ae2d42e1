"""Recurrent cells: each owns its parameter shapes, its forward and backward recurrences, its step
Jacobian factors and its kernels (NumPy twins, CUDA sources as package data). The engine that runs a
cell over time (``gpubptt.engine.stack``) knows none of a cell's math. What it asks of a cell:

    name, gates          the cell's name; rows of U (gates·H, D_l) and W (gates·H, H) per hidden unit
    input_bias           the name of the bias added in the input projection (None: no such bias)
    extra_state          False, or the name of a state carried beside s ("c0": an LSTM's cell state);
                         the engine loads it, keeps its gradient under that name and reads it back
    param_shapes(D, H, bias) → {base name: shape}    one recurrence's parameters ("U", "W", "b", …);
                         the engine adds the layer/direction suffix (W_l1_reverse)
    buffers(T, B, H, xp=, dtype=) → {name: array}    what the cell keeps from forward to backward
                         besides the states S (T+1, B, H) (gate activations, a cell state, …)
    load(aux, state0)    set any state beyond s0 (an LSTM's c0, (B, H) or None for zeros) before a forward
    cell_states(aux)     that state at every step, (T+1, B, H) like S, or None (what final states read)
    projection_buffer(aux, be)  None (the default: the engine's shared ``pre``), or one of the cell's
                         buffers (T, B, gates·H) the engine projects the input into, for the cell's
                         forward to work in place there
    adds_input_bias(be)  False (the default: the engine adds input_bias in its projection), or True: the
                         cell's run_forward adds it to pre itself (the LSTM, in its compiled step loops)
    run_forward(pre, p, S, aux, be=, scratch=, step_kernels=)
                         all steps: pre (T, B, gates·H) = U x_t + input bias (one GEMM the engine ran; no
                         bias where adds_input_bias), p the recurrence's parameters by base name, S[0] = s0
                         on entry, S[1:] written
    run_backward(G, p, S, aux, be=, work=, scratch=, step_kernels=, truncate=, lanes=, grads=, ds0=[, d_extra=])
                         → ∂E/∂pre (T, B, gates·H). G (T, B, H) enters as ∂E/∂s_t from above; the cell
                         writes its recurrent-side gradients (W, and any bias not in the input
                         projection) into grads (by base name; every entry: they are not zeroed
                         before), ∂E/∂s0 into ds0 and ∂E/∂(extra
                         state at step 0) into grads[extra_state]; ``work`` (T, B,
                         gates·H) is free for it, and the result may be it, G, or one of the cell's
                         ``buffers`` (a backward pass spends its forward's buffers). The engine then
                         forms dU = Σ ∂E/∂preᵀ x_t (one GEMM), the input bias's gradient and ∂E/∂x
                         (one GEMM, for the layer below).

    extra_state          (again) truthy when the cell carries state beyond s from one step to the next
                         (an LSTM's cell state). Recomputation (``gpubptt.engine.recompute``) keeps s (and that
                         state, ``cell_states(aux)``) at segment boundaries and recomputes the cell's
                         ``buffers`` per segment (``buffers(n, …)`` for each segment length n, ``load(aux,
                         boundary state)`` before each segment's forward, ``run_backward`` with ``ds0`` and
                         grads[extra_state] taken as the carries into the previous segment and
                         the keyword ``d_extra`` {t: [(rows, values)]}, direct terms on the extra state
                         at the steps named, for the batch rows ``rows`` (a slice or an index array;
                         values (len(rows), H)), carrying it in; the pullback passes the final extra
                         state's gradient the same way, and ``register_cell`` refuses an extra-state
                         cell whose ``run_backward`` does not take it);
                         it refuses a cell without the attribute.

A reverse recurrence sees its inputs in its own time (the engine reverses them per sequence), so a
cell never knows its direction.

Every cell subclasses ``Cell`` (``cells.base``: the defaults, and what the rest of gpubptt reads:
option name, torch module, init bounds, step Jacobian, FLOPs per step, buffer sizes) and is made a
``cell=`` option by ``register_cell``; ``make_cell``, ``cell_class`` and ``cell_names`` read the registry.

Cells: ``ElmanCell`` (torch.nn.RNN, tanh or relu), ``GRUCell`` (torch.nn.GRU), ``LSTMCell``
(torch.nn.LSTM) and ``IndRNNCell`` (``indrnn``: s_t = φ(U x_t + b + w ⊙ s_{t−1}), no torch module).
Tutorial truncation (``truncate=k``) runs inside each cell's ``run_backward``: the
Elman cell through lanes of δ (``elman.backward_truncated``), the gated cells through
lanes of state gradients (∂E_{t+d}/∂h_t, and ∂/∂c_t for the LSTM) that each pass the step's gates.
"""

from __future__ import annotations

from .base import INITS, Cell, cell_class, cell_names, make_cell, register_cell

# registration order is the order of the choices: torch's cells first
# isort: off
from .elman import NONLINEARITIES, STEP_KERNELS, ElmanCell
from .gru import GRUCell
from .lstm import LSTMCell
from .indrnn import IndRNNCell
# isort: on

__all__ = [
    "INITS", "NONLINEARITIES", "STEP_KERNELS", "Cell", "ElmanCell", "GRUCell", "IndRNNCell", "LSTMCell", "cell_class",
    "cell_names", "make_cell", "register_cell",
]  # fmt: skip
