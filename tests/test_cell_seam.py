"""A cell written as docs/cells.md says, and the mistakes a cell's author can make, each caught with a message that
names the cell and what its declaration gets wrong, before any work: options that rebuild the cell from a
checkpoint without a ``from_options`` of its own, reserved parameter names, shapes, the input bias, the extra
state's ``d_extra``, abstract classes and what ``run_backward`` returns; and the model's repr rebuilds its cell."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpubptt
from gpubptt.cells import Cell, IndRNNCell, register_cell
from gpubptt.errors import CheckpointError, InputError
from gpubptt.training.record import load_checkpoint, save_checkpoint
from tests.test_toy_cell import LeakyCell


@register_cell
class PlainOptionsCell(LeakyCell):
    """The toy cell without a ``from_options`` of its own: the docs' example, whose options are its constructor's."""

    option = "seam-plain"
    from_options = Cell.__dict__["from_options"]


class _Positional(LeakyCell):
    """A cell whose constructor does not take its options() by name: a checkpoint of it could not be loaded."""

    option = "seam-positional"
    from_options = Cell.__dict__["from_options"]

    def __init__(self, rate: float = 0.5) -> None:
        super().__init__(rate)


register_cell(_Positional)


@pytest.fixture(autouse=True)
def _registry_as_it_was():
    """Cells a test registers are gone after it: the registry is process-wide, and other tests list its cells."""
    from gpubptt.cells import base

    before = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(before)


def _shaped(option: str, shapes: Any, **attrs: Any) -> type[Cell]:
    """A registered LeakyCell whose param_shapes returns ``shapes`` (a function of D, H, bias)."""
    cls = type(f"Cell_{option.replace('-', '_')}", (LeakyCell,), {"option": option, **attrs})
    cls.param_shapes = lambda self, D, H, bias: shapes(D, H, bias)
    return register_cell(cls)


def _toy(cell: Any, **kw: Any) -> gpubptt.RNN:
    return gpubptt.RNN(4, 3, 4, cell=cell, backend="numpy", dtype="float64", seed=0, **kw)


def test_a_cell_without_from_options_round_trips_through_a_checkpoint(tmp_path):
    model = _toy(PlainOptionsCell(0.25))
    path = save_checkpoint(tmp_path / "plain.npz", model)
    back = load_checkpoint(path, backend="numpy").model
    assert back.cell == PlainOptionsCell(0.25)
    for name in model.params:
        np.testing.assert_array_equal(back.params[name], model.params[name])


def test_a_cell_whose_options_do_not_rebuild_it_is_not_written(tmp_path):
    path = tmp_path / "kept.npz"
    path.write_bytes(b"the user's file")
    with pytest.raises(CheckpointError, match=r"do not rebuild it through _Positional\.from_options.*lam"):
        save_checkpoint(path, _toy(_Positional(0.25)))
    assert path.read_bytes() == b"the user's file"
    with pytest.raises(
        InputError,
        match=r"cell 'seam-positional' cannot be built from the options \['lam'\] \(.*unexpected keyword .*'lam'",
    ):
        _Positional.from_options(lam=0.5)


def test_a_cell_that_declares_no_options_still_refuses_them():
    with pytest.raises(InputError, match="cell 'gru' takes no options"):
        gpubptt.cells.GRUCell.from_options(lam=1)


@pytest.mark.parametrize(
    ("option", "shapes", "match"),
    [
        ("seam-c", lambda D, H, bias: {"U": (H, D), "c": (H,)}, r"'c', which the model reserves"),
        ("seam-v", lambda D, H, bias: {"U": (H, D), "V": (H, H)}, r"'V', which the model reserves"),
        ("seam-s0", lambda D, H, bias: {"U": (H, D), "s0": (H,)}, r"'s0', which the model reserves"),
        ("seam-suffix", lambda D, H, bias: {"U": (H, D), "w_l1": (H,)}, r"'w_l1', which the model reserves"),
        ("seam-rev", lambda D, H, bias: {"U": (H, D), "w_reverse": (H,)}, r"'w_reverse'"),
        ("seam-nou", lambda D, H, bias: {"Q": (H, D)}, r"must give U the shape \(gates·H, D\) = \(3, 4\).*no U"),
        ("seam-ucols", lambda D, H, bias: {"U": (H, D + 1)}, r"must give U the shape .* got \(3, 5\)"),
        ("seam-urows", lambda D, H, bias: {"U": (2 * H, D)}, r"\(gates = 1.*got \(6, 4\)"),
        ("seam-dims", lambda D, H, bias: {"U": (H, D), "w": (H, 0)}, r"gives 'w' the shape \(3, 0\)"),
        ("seam-float", lambda D, H, bias: {"U": (H, D), "w": (1.5,)}, r"expected a tuple of ints ≥ 1"),
        ("seam-bias", lambda D, H, bias: {"U": (H, D), "bb": (H,)}, r"input_bias = 'b' must name .*no such parameter"),
    ],
)
def test_a_malformed_param_shapes_is_refused_naming_the_cell(option, shapes, match):
    _shaped(option, shapes)
    with pytest.raises(InputError, match=rf"cell '{option}': param_shapes\(4, 3, True\).*{match}"):
        gpubptt.RNN(4, 3, 4, cell=option, backend="numpy", bias=True)


def test_shapes_given_as_lists_are_read_as_tuples():
    _shaped("seam-lists", lambda D, H, bias: {"U": [H, D], **({"b": [H]} if bias else {})})
    model = _toy("seam-lists")
    assert model.params["U"].shape == (3, 4) and model.params["b"].shape == (3,)
    rng = np.random.default_rng(0)
    loss, _ = model.loss_and_grads(rng.normal(size=(5, 2, 4)), rng.integers(0, 4, (5, 2)))
    assert np.isfinite(loss)


def test_register_cell_refuses_an_abstract_class_and_an_extra_state_cell_without_d_extra():
    class Unfinished(Cell):
        option = "seam-unfinished"
        extra_state = False

        def param_shapes(self, D, H, bias):
            return {"U": (H, D)}

    with pytest.raises(InputError, match=r"'seam-unfinished' \(Unfinished\) does not define run_backward, run_forward"):
        register_cell(Unfinished)

    class NoExtraTerms(LeakyCell):
        option = "seam-memory"
        extra_state = "m0"

    with pytest.raises(InputError, match=r"carries 'm0', so its run_backward must take the keyword d_extra"):
        register_cell(NoExtraTerms)

    class Impostor(LeakyCell):
        option = "seam-impostor"
        name = "elman"  # what checkpoints of the rnn cell record

    with pytest.raises(InputError, match=r"the recorded name 'elman' is already that of cell 'rnn' \(ElmanCell\)"):
        register_cell(Impostor)


def test_what_run_backward_returns_is_checked():
    class WrongReturn(LeakyCell):
        option = "seam-return"

        def run_backward(self, G, p, S, aux, **kw):
            return super().run_backward(G, p, S, aux, **kw)[:, :1]  # one batch row only

    register_cell(WrongReturn)

    class NoReturn(LeakyCell):
        option = "seam-none"

        def run_backward(self, G, p, S, aux, **kw):
            super().run_backward(G, p, S, aux, **kw)

    register_cell(NoReturn)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 2, 4)), rng.integers(0, 4, (5, 2))
    for recompute in (None, 2):
        with pytest.raises(InputError, match=r"cell 'seam-none': run_backward returned NoneType; expected ∂E/∂pre"):
            _toy("seam-none").loss_and_grads(x, y, recompute=recompute)
        with pytest.raises(InputError, match=r"cell 'seam-return': run_backward returned shape \(\d, 1, 3\); expected"):
            _toy("seam-return").loss_and_grads(x, y, recompute=recompute)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"nonlinearity": "relu"},
        {"cell": "gru"},
        {"cell": "indrnn"},
        {"cell": "indrnn", "nonlinearity": "tanh"},
        {"cell": IndRNNCell("relu", max_weight=1.01)},
        {"cell": PlainOptionsCell(0.25)},
    ],
)
def test_the_repr_rebuilds_the_cell(kw):
    model = gpubptt.RNN(3, 4, 5, backend="numpy", **kw)
    scope = {"RNN": gpubptt.RNN, "IndRNNCell": IndRNNCell, "PlainOptionsCell": PlainOptionsCell}
    assert eval(repr(model), scope).cell == model.cell


def test_a_decorated_run_backward_must_take_d_extra_where_it_is_called():
    import functools

    from gpubptt.cells import LSTMCell

    def timed(fn):
        @functools.wraps(fn)  # the wrapper's own signature, not the wrapped one's, is what the engine calls
        def wrapper(self, G, p, S, aux, *, be, work, scratch, step_kernels, truncate, lanes, grads, ds0):
            return fn(self, G, p, S, aux, be=be, work=work, scratch=scratch, step_kernels=step_kernels,
                      truncate=truncate, lanes=lanes, grads=grads, ds0=ds0)  # fmt: skip

        return wrapper

    class Timed(LSTMCell):
        option = "seam-timed"
        name = "seam-timed"
        run_backward = timed(LSTMCell.run_backward)

    with pytest.raises(InputError, match="so its run_backward must take the keyword d_extra"):
        register_cell(Timed)

    class Forwarding(LSTMCell):  # a wrapper that passes every keyword on: fine
        option = "seam-forwarding"
        name = "seam-forwarding"
        torch_module = None  # registered for good: not a second nn.LSTM for the torch interchange to consider
        run_backward = functools.wraps(LSTMCell.run_backward)(
            lambda self, *a, **kw: LSTMCell.run_backward(self, *a, **kw)
        )

    register_cell(Forwarding)


class _NeedsOption(LeakyCell):
    option = "seam-needs"
    from_options = Cell.__dict__["from_options"]

    def __init__(self, lam: float) -> None:
        super().__init__(lam)


register_cell(_NeedsOption)


def test_a_cell_that_needs_its_options_is_refused_by_name_and_its_model_reprs(tmp_path):
    with pytest.raises(InputError, match=r"cell 'seam-needs' cannot be built from no options \(.*lam"):
        gpubptt.RNN(4, 3, 4, cell="seam-needs", backend="numpy")
    model = _toy(_NeedsOption(0.3))
    assert "cell=_NeedsOption(lam=0.3)" in repr(model)
    back = load_checkpoint(save_checkpoint(tmp_path / "needs.npz", model), backend="numpy").model
    assert back.cell == _NeedsOption(0.3)


def test_a_checkpoint_refuses_an_unregistered_subclass_and_options_json_would_change(tmp_path):
    from gpubptt.cells import GRUCell

    class MyGRU(GRUCell):  # not registered: a file would rebuild a plain GRU
        pass

    path = tmp_path / "kept.npz"
    path.write_bytes(b"the user's file")
    with pytest.raises(
        CheckpointError, match=r"the cell class MyGRU is not a registered cell \(option 'gru' is GRUCell"
    ):
        save_checkpoint(path, gpubptt.RNN(4, 3, 4, cell=MyGRU(), backend="numpy"))

    @register_cell
    class TupleOption(LeakyCell):  # options() gives a tuple; the file's JSON would give a list back
        option = "seam-tuple"
        from_options = Cell.__dict__["from_options"]

        def __init__(self, lams: tuple = (0.25, 0.5)) -> None:
            super().__init__(lams[0])
            self.lams = lams

        def options(self) -> dict[str, Any]:
            return {"lams": self.lams}

    with pytest.raises(CheckpointError, match=r"do not rebuild it .*they build TupleOption\(lams=\[0.25, 0.5\]\)"):
        save_checkpoint(path, _toy(TupleOption()))
    assert path.read_bytes() == b"the user's file"


def test_a_registered_variant_of_a_torch_cell_leaves_the_torch_interchange_of_the_original_alone():
    torch = pytest.importorskip("torch")
    from gpubptt.cells import LSTMCell, base

    class Variant(LSTMCell):  # the same parameters as nn.LSTM's, registered under its own name
        option = "seam-variant"
        name = "seam-variant"

    register_cell(Variant)
    try:  # an nn.LSTM state dict read as cell="lstm" was refused as "the state dict of ... cell='seam-variant'"
        lstm, lin = torch.nn.LSTM(3, 4).double(), torch.nn.Linear(4, 5).double()
        model = gpubptt.RNN.from_torch(lstm.state_dict(), lin.state_dict(), cell="lstm", backend="numpy")
        np.testing.assert_array_equal(model.params["W"], lstm.weight_hh_l0.detach().numpy())
        gru = torch.nn.GRU(3, 4).double()
        with pytest.raises(gpubptt.ShapeError, match=r"the state dict of an nn.GRU \(cell='gru'\)"):
            gpubptt.RNN.from_torch(gru.state_dict(), lin.state_dict(), cell="lstm", backend="numpy")
    finally:
        del base._REGISTRY[Variant.option]


def test_a_recorded_cell_option_of_a_bad_value_is_a_checkpoint_error(tmp_path):
    import json

    path = save_checkpoint(tmp_path / "bad.npz", _toy(PlainOptionsCell(0.25)))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["model"]["cell_options"] = {"lam": "abc"}  # LeakyCell's float("abc"): a ValueError
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"bad cell options \(could not convert string to float"):
        load_checkpoint(path, backend="numpy")
