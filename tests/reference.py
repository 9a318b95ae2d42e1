"""Independent references for the tests: plain per-example NumPy loops in float64.

Written straight from the formulas, one sequence and one step at a time, sharing no code with the
package, so agreement means something.
"""

from __future__ import annotations

import numpy as np


def phi(a, nonlinearity="tanh"):
    """The recurrence's nonlinearity, written out: tanh, or relu = max(a, 0)."""
    return np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0.0)


def dphi(s, nonlinearity="tanh"):
    """Its derivative at the pre-activation, from the state s = φ(a): 1 − s² for tanh, 1[s > 0] for relu."""
    return 1 - s**2 if nonlinearity == "tanh" else (s > 0).astype(float)


def ref_forward_one(params, x, s0, nonlinearity="tanh"):
    """States of one sequence: x (T,) ids or (T, D) floats, s0 (H,) → list of s_t (H,)."""
    U, W = params["U"], params["W"]
    b = params.get("b", 0.0)
    s, out = s0, []
    for t in range(len(x)):
        ux = U[:, x[t]] if np.ndim(x) == 1 else U @ x[t]
        s = phi(ux + W @ s + b, nonlinearity)
        out.append(s)
    return out


def ref_loss(params, x, y, s0=None, lengths=None, reduction="sum", nonlinearity="tanh"):
    """Σ over counted steps of −log softmax(V s_t + c)[y_t]; x (T, B) or (T, B, D), y (T, B)."""
    T, B = y.shape
    H = params["W"].shape[0]
    V, c = params["V"], params.get("c", 0.0)
    total, count = 0.0, 0
    for bi in range(B):
        n = T if lengths is None else int(lengths[bi])
        h0 = np.zeros(H) if s0 is None else s0[bi]
        states = ref_forward_one(params, x[:n, bi], h0, nonlinearity)
        for t in range(n):
            z = V @ states[t] + c
            z = z - z.max()
            total -= z[y[t, bi]] - np.log(np.exp(z).sum())
            count += 1
    return total / count if reduction == "mean" else total


def ref_tutorial_truncated_grads(params, x, y, truncate, s0=None, nonlinearity="tanh"):
    """The classic tutorial BPTT, one sequence at a time, no biases: grads of U, W, V, s0.

    For each t, delta flows back through steps t, t−1, …, t−truncate only.
    """
    W, V = params["W"], params["V"]
    T, B = y.shape
    H = W.shape[0]
    g = {k: np.zeros_like(params[k]) for k in ("U", "W", "V")}
    g["s0"] = np.zeros((B, H))
    for bi in range(B):
        h0 = np.zeros(H) if s0 is None else s0[bi]
        s = [h0, *ref_forward_one(params, x[:, bi], h0, nonlinearity)]  # s[t+1] = s_t
        for t in range(T):
            z = V @ s[t + 1]
            p = np.exp(z - z.max())
            p /= p.sum()
            do = p.copy()
            do[y[t, bi]] -= 1
            g["V"] += np.outer(do, s[t + 1])
            delta = (V.T @ do) * dphi(s[t + 1], nonlinearity)
            for step in range(t, max(0, t - truncate) - 1, -1):
                g["W"] += np.outer(delta, s[step])
                if np.ndim(x) == 2:
                    g["U"][:, x[step, bi]] += delta
                else:
                    g["U"] += np.outer(delta, x[step, bi])
                if step == 0:
                    g["s0"][bi] += W.T @ delta
                delta = (W.T @ delta) * dphi(s[step], nonlinearity)
    return g


def numeric_grad(f, arr, eps=1e-6):
    """Central differences of scalar f() with respect to every entry of arr (perturbed in place)."""
    out = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), out.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        up = f()
        flat[i] = orig - eps
        down = f()
        flat[i] = orig
        gflat[i] = (up - down) / (2 * eps)
    return out


def numeric(f, arr, idx, eps=1e-6):
    """Central differences of the scalar f() in the coordinates idx of arr (perturbed in place, restored)."""
    flat, out = arr.reshape(-1), []
    for i in idx:
        orig = flat[i]
        flat[i] = orig + eps
        up = f()
        flat[i] = orig - eps
        down = f()
        flat[i] = orig
        out.append((up - down) / (2 * eps))
    return np.array(out)


def stack_name(base, layer, direction):
    """A deep model's parameter name, as documented: W, W_reverse, W_l1, W_l1_reverse, …"""
    return base + ("" if layer == 0 else f"_l{layer}") + ("_reverse" if direction else "")


def ref_stack_one(params, x, h0, num_layers, bidirectional, nonlinearity="tanh", masks=None):
    """One sequence through a stack, written from torch.nn.RNN's definition: x (n,) ids or (n, D) floats,
    its valid steps only; h0 (L·dirs, H). Returns (top outputs (n, H·dirs), finals (L·dirs, H)).

    Layer l > 0 reads [forward, reverse] outputs of layer l − 1, times masks[l − 1] (n, H·dirs) if given.
    The reverse direction reads the sequence from its last valid step back to step 0.
    """
    dirs = 2 if bidirectional else 1
    n = len(x)
    inp = x
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            U, W = params[stack_name("U", layer, d)], params[stack_name("W", layer, d)]
            b = params.get(stack_name("b", layer, d), 0.0)
            h = h0[layer * dirs + d]
            out = [None] * n
            for t in range(n - 1, -1, -1) if d else range(n):
                ux = U[:, inp[t]] if np.ndim(inp) == 1 else U @ inp[t]
                h = phi(ux + W @ h + b, nonlinearity)
                out[t] = h
            finals.append(h)
            outs.append(np.array(out, dtype=float).reshape(n, W.shape[0]))
        inp = np.concatenate(outs, axis=1)
        if masks is not None and layer < num_layers - 1:
            inp = inp * masks[layer]
    return inp, np.array(finals)


def ref_stack_loss(params, x, y, s0=None, lengths=None, reduction="sum", nonlinearity="tanh", num_layers=1,
                   bidirectional=False, masks=None):  # fmt: skip
    """Σ over counted steps of −log softmax(V o_t + c)[y_t], o_t the top layer's outputs; s0 (L·dirs, B, H).

    masks: per layer below the top, (T, B, H·dirs) dropout multipliers, or None.
    """
    T, B = y.shape
    H = params["W"].shape[0]
    V, c = params["V"], params.get("c", 0.0)
    n_states = num_layers * (2 if bidirectional else 1)
    total, count = 0.0, 0
    for bi in range(B):
        n = T if lengths is None else int(lengths[bi])
        h0 = np.zeros((n_states, H)) if s0 is None else s0[:, bi]
        m = None if masks is None else [mk[:n, bi] for mk in masks]
        top, _ = ref_stack_one(params, x[:n, bi], h0, num_layers, bidirectional, nonlinearity, m)
        for t in range(n):
            z = V @ top[t] + c
            z = z - z.max()
            total -= z[y[t, bi]] - np.log(np.exp(z).sum())
            count += 1
    return total / count if reduction == "mean" else total


def sigmoid(a):
    """σ(a) = 1 / (1 + e^−a), written out."""
    return 1.0 / (1.0 + np.exp(-a))


def ref_gated_step(cell, params, layer, d, x_t, h, c):
    """One step of torch.nn.GRU / nn.LSTM's cell, from torch's documented equations, gate by gate.

    GRU (gates r, z, n): r = σ(W_ir x + W_hr h + b_r), z = σ(W_iz x + W_hz h + b_z),
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h′ = (1 − z) ⊙ n + z ⊙ h.
    LSTM (gates i, f, g, o): c′ = σ(f) ⊙ c + σ(i) ⊙ tanh(g), h′ = σ(o) ⊙ tanh(c′).
    Returns (h′, c′) (c′ None for the GRU).
    """
    U, W = params[stack_name("U", layer, d)], params[stack_name("W", layer, d)]
    H = W.shape[1]
    ux = U[:, x_t] if np.ndim(x_t) == 0 else U @ x_t
    b = params.get(stack_name("b", layer, d), np.zeros(U.shape[0]))
    if cell == "gru":
        b_hn = params.get(stack_name("b_hn", layer, d), np.zeros(H))
        W_r, W_z, W_n = W[:H], W[H : 2 * H], W[2 * H :]
        r = sigmoid(ux[:H] + W_r @ h + b[:H])
        z = sigmoid(ux[H : 2 * H] + W_z @ h + b[H : 2 * H])
        n = np.tanh(ux[2 * H :] + b[2 * H :] + r * (W_n @ h + b_hn))
        return (1 - z) * n + z * h, None
    a = ux + W @ h + b
    i, f, g, o = sigmoid(a[:H]), sigmoid(a[H : 2 * H]), np.tanh(a[2 * H : 3 * H]), sigmoid(a[3 * H :])
    c = f * c + i * g
    return o * np.tanh(c), c


def ref_gated_stack_one(cell, params, x, h0, c0, num_layers, bidirectional, masks=None):
    """One sequence through a GRU/LSTM stack (torch's definition): x (n,) ids or (n, D) floats, valid steps
    only; h0, c0 (L·dirs, H) (c0 ignored for the GRU). Returns (top outputs (n, H·dirs), h_n, c_n)."""
    dirs = 2 if bidirectional else 1
    n = len(x)
    inp = x
    hs, cs = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            h, c = h0[layer * dirs + d], c0[layer * dirs + d]
            out = [None] * n
            for t in range(n - 1, -1, -1) if d else range(n):
                h, c = ref_gated_step(cell, params, layer, d, inp[t], h, c)
                out[t] = h
            hs.append(h)
            cs.append(c)
            outs.append(np.array(out, dtype=float).reshape(n, h.shape[0]))
        inp = np.concatenate(outs, axis=1)
        if masks is not None and layer < num_layers - 1:
            inp = inp * masks[layer]
    return inp, np.array(hs), (np.array(cs) if cell == "lstm" else None)


def ref_gated_loss(cell, params, x, y, h0=None, c0=None, lengths=None, reduction="sum", num_layers=1,
                   bidirectional=False, masks=None):  # fmt: skip
    """Σ over counted steps of −log softmax(V o_t + c)[y_t] for a GRU/LSTM stack; h0, c0 (L·dirs, B, H) or None."""
    T, B = y.shape
    H = params["W"].shape[1]
    V, cb = params["V"], params.get("c", 0.0)
    n_states = num_layers * (2 if bidirectional else 1)
    total, count = 0.0, 0
    for bi in range(B):
        n = T if lengths is None else int(lengths[bi])
        h = np.zeros((n_states, H)) if h0 is None else h0[:, bi]
        c = np.zeros((n_states, H)) if c0 is None else c0[:, bi]
        m = None if masks is None else [mk[:n, bi] for mk in masks]
        top, _, _ = ref_gated_stack_one(cell, params, x[:n, bi], h, c, num_layers, bidirectional, m)
        for t in range(n):
            z = V @ top[t] + cb
            z = z - z.max()
            total -= z[y[t, bi]] - np.log(np.exp(z).sum())
            count += 1
    return total / count if reduction == "mean" else total


def central_differences(model, x, y, s0=None, lengths=None, h=1e-6):
    """Every parameter's gradient of ``model.loss`` by central differences (float64), one coordinate at a time."""
    out = {}
    for name in model.params:
        p = model.params[name]
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = model.loss(x, y, s0, lengths=lengths)
            p[i] = old - h
            down = model.loss(x, y, s0, lengths=lengths)
            p[i] = old
            g[i] = (up - down) / (2 * h)
        out[name] = g
    return out
