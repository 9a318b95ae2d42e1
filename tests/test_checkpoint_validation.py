"""Malformed checkpoints: every field is checked, and each problem is refused with a line naming it.

Each case below writes a valid checkpoint, breaks one field, and loads it: a CheckpointError (a
ValueError) must name the broken field. Cases that crashed the loader or that it accepted are
marked ``# was:``; the others were refused, but without naming the field.
"""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.cli import app
from gpubptt.training.checkpoint_meta import VERSION
from gpubptt.training.data import CopyTask, TextData
from gpubptt.training.loop import TrainConfig, train
from gpubptt.training.optim import make_optimizer
from gpubptt.training.record import CheckpointError, load_checkpoint, save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def text_ck(tmp_path_factory):
    """A text run saved mid-sequence (a carried state, a history with evaluations)."""
    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=0)
    opt = make_optimizer("adam", model)
    config = TrainConfig(steps=5, batch_size=3, chunk=6, eval_every=2)
    state, history = train(model, data, opt, config)
    assert state.s is not None and state.chunk > 0
    path = tmp_path_factory.mktemp("ck") / "text.npz"
    save_checkpoint(
        path, model, optimizer=opt, vocab=data.vocab, data=data.spec(), config=config, state=state, history=history
    )
    return path


@pytest.fixture(scope="module")
def copy_ck(tmp_path_factory):
    data = CopyTask(symbols=4, length=3, delay=2)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, momentum=0.5)
    config = TrainConfig(steps=3, batch_size=2, chunk=None, eval_every=0)
    state, history = train(model, data, opt, config)
    path = tmp_path_factory.mktemp("ck") / "copy.npz"
    save_checkpoint(path, model, optimizer=opt, data=data.spec(), config=config, state=state, history=history)
    return path


def _set(*keys_value):
    """An edit of the meta dict: _set("state", "step", -10) sets meta["state"]["step"] = -10."""
    *keys, value = keys_value

    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
        return meta

    return edit


def _drop(*keys):
    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return meta

    return edit


META_CASES = {  # id: (edit of the meta dict, what the message must name)
    "meta-is-a-list": (lambda m: [m], "'meta' is the JSON list"),  # was: AttributeError
    "meta-is-a-string": (lambda m: "hello", "'meta' is the JSON str"),  # was: AttributeError
    "version-true": (_set("version", True), "format version true"),  # was: accepted
    "unknown-section": (_set("extra", 1), "meta.extra"),  # was: accepted
    "model-missing": (_drop("model"), "meta.model is missing"),
    "model-is-a-list": (_set("model", [1, 2]), "model = [1, 2]"),
    "bias-no": (_set("model", "bias", "no"), 'model.bias = "no"'),  # was: read as true
    "hidden-float": (_set("model", "hidden_size", 8.0), "model.hidden_size = 8.0"),  # was: accepted
    "hidden-true": (_set("model", "hidden_size", True), "model.hidden_size = true"),
    "dtype-float16": (_set("model", "dtype", "float16"), "model.dtype"),
    "init-number": (_set("model", "init", 3), "model.init = 3"),  # was: accepted
    "model-extra-field": (_set("model", "layers", 2), "model.layers"),  # was: accepted
    "optimizer-string": (_set("optimizer", "adam"), 'optimizer = "adam"'),  # was: AttributeError
    "optimizer-list": (_set("optimizer", [1]), "optimizer = [1]"),  # was: AttributeError
    "optimizer-name": (_set("optimizer", "name", "rmsprop"), "optimizer.name"),
    "optimizer-lr-negative": (_set("optimizer", "lr", -1), "optimizer.lr = -1"),
    "optimizer-lr-string": (_set("optimizer", "lr", "0.1"), "optimizer.lr"),
    "optimizer-lr-past-float": (_set("optimizer", "lr", 10**400), "optimizer.lr"),  # was: OverflowError
    "optimizer-betas-short": (_set("optimizer", "betas", [0.9]), "optimizer.betas"),  # was: IndexError
    "optimizer-eps-string": (_set("optimizer", "eps", "tiny"), "optimizer.eps"),  # was: ValueError from float()
    "optimizer-on-nonfinite": (_set("optimizer", "on_nonfinite", "ignore"), "optimizer.on_nonfinite"),
    "optimizer-unknown-field": (_set("optimizer", "nesterov", True), "optimizer.nesterov"),
    "data-number": (_set("data", 5), "data = 5"),  # was: accepted
    "data-string": (_set("data", "text"), 'data = "text"'),  # was: accepted
    "data-kind": (_set("data", "kind", "image"), "data.kind"),  # was: accepted
    "data-source-number": (_set("data", "source", 3), "data.source = 3"),  # was: accepted
    "data-val-fraction": (_set("data", "val_fraction", 1.5), "data.val_fraction = 1.5"),  # was: accepted
    "data-sha256": (_set("data", "sha256", "xyz"), "data.sha256"),
    "data-size-negative": (_set("data", "size_bytes", -4), "data.size_bytes = -4"),
    "config-string": (_set("config", "steps"), 'config = "steps"'),
    "config-batch-string": (_set("config", "batch_size", "3"), "config.batch_size"),
    "config-chunk-zero": (_set("config", "chunk", 0), "config.chunk = 0"),
    "config-lr-nan": (_set("config", "lr", math.nan), "config.lr = NaN"),
    "config-steps-float": (_set("config", "steps", 5.0), "config.steps = 5.0"),
    "config-lr-past-float": (_set("config", "lr", 10**400), "config.lr = 1000"),  # was: OverflowError
    "config-max-norm-past-float": (_set("config", "max_norm", 10**400), "config.max_norm"),  # was: OverflowError
    "config-schedule": (_set("config", "schedule", "linear"), "config.schedule"),
    "state-missing-step": (_drop("state", "step"), "state.step is missing"),
    "step-negative": (_set("state", "step", -10), "state.step = -10"),  # was: accepted, then ZeroDivisionError
    "step-fraction": (_set("state", "step", 1.5), "state.step = 1.5"),  # was: accepted
    "step-huge": (_set("state", "step", 1e30), "state.step = 1e+30"),  # was: accepted
    "step-too-big-for-int64": (_set("state", "step", 2**70), "state.step"),  # was: accepted
    "sequence-negative": (
        _set("state", "sequence", -1),
        "state.sequence = -1",
    ),  # was: accepted, then a crash in the data order
    "chunk-1e9": (_set("state", "chunk", 1e9), "state.chunk = 1000000000.0"),  # was: accepted
    "chunk-beyond-the-sequence": (_set("state", "chunk", 10**9), "state.chunk = 1000000000"),  # was: accepted
    # format version 2 records the architecture; it must be one built here, and match the parameters
    "cell-transformer": (_set("model", "cell", "transformer"), "model.cell = \"transformer\", expected one of 'elman'"),
    "cell-gru-with-a-nonlinearity": (_set("model", "cell", "gru"), 'model.nonlinearity = "tanh", expected null'),
    "cell-missing": (_drop("model", "cell"), "model.cell is missing"),
    "nonlinearity-sigmoid": (
        _set("model", "nonlinearity", "sigmoid"),
        'model.nonlinearity = "sigmoid", expected one of',
    ),
    "zero-layers": (_set("model", "num_layers", 0), "model.num_layers = 0, expected an int from 1 to 1024"),
    "two-layers-one-layer-params": (_set("model", "num_layers", 2), "is missing parameter U_l1"),
    "layers-true": (_set("model", "num_layers", True), "model.num_layers = true"),
    "bidirectional-one-direction-params": (_set("model", "bidirectional", True), "is missing parameter U_reverse"),
    "dropout-one": (_set("model", "dropout", 1.0), "model.dropout = 1.0, expected a number in [0, 1)"),
    "dropout-text": (_set("model", "dropout", "0.5"), 'model.dropout = "0.5"'),
    "bidirectional-zero": (_set("model", "bidirectional", 0), "model.bidirectional = 0"),
    "version-5": (_set("version", 5), "format version 5; this gpubptt reads 1, 2, 3 and 4"),
}


def _rewrite(src, dst, *, meta=None, changes=None):
    arrays = _arrays(src)
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta(json.loads(str(arrays["meta"])))))
    for k, v in (changes or {}).items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    np.savez(dst, **arrays)
    return dst


@pytest.mark.parametrize("case", list(META_CASES))
def test_each_malformed_meta_field_is_refused_naming_the_field(tmp_path, text_ck, case):
    edit, names = META_CASES[case]
    path = _rewrite(text_ck, tmp_path / "bad.npz", meta=edit)
    raw = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, backend="numpy")
    assert isinstance(info.value, ValueError)
    assert names in str(info.value)
    assert path.read_bytes() == raw  # loading never touches the file


def test_the_saved_description_records_the_architecture(text_ck):
    meta = json.loads(str(_arrays(text_ck)["meta"]))
    assert meta["version"] == VERSION
    arch = {k: meta["model"][k] for k in ("cell", "nonlinearity", "num_layers", "bidirectional")}
    assert arch == {"cell": "elman", "nonlinearity": "tanh", "num_layers": 1, "bidirectional": False}


def test_a_version_1_checkpoint_still_loads_as_the_one_architecture_it_could_hold(tmp_path, text_ck):
    def as_version_1(meta):  # what gpubptt wrote before the architecture was recorded
        meta["version"] = 1
        for k in ("cell", "nonlinearity", "num_layers", "bidirectional"):
            del meta["model"][k]
        return meta

    old = _rewrite(text_ck, tmp_path / "v1.npz", meta=as_version_1)
    ck, ref = load_checkpoint(old, backend="numpy"), load_checkpoint(text_ck, backend="numpy")
    assert ck.meta["version"] == 1 and ck.state.step == ref.state.step and ck.model.cell.name == "elman"
    for k, v in ref.model.params.items():
        np.testing.assert_array_equal(ck.model.params[k], v)
    new = tmp_path / "again.npz"  # saved again, it is written as the current version
    save_checkpoint(new, ck.model, optimizer=ck.optimizer, vocab=ck.vocab, data=ck.data, config=ck.config,
                    state=ck.state, history=ck.history)  # fmt: skip
    assert json.loads(str(_arrays(new)["meta"]))["version"] == VERSION


COPY_CASES = {
    "kind-recall-with-length-3": (_set("data", "kind", "recall"), "data.kind"),  # was: accepted
    "symbols-do-not-fit-the-model": (_set("data", "symbols", 9), "data.symbols = 9"),  # was: accepted
    "delay-negative": (_set("data", "delay", -1), "data.delay = -1"),  # was: accepted
    "length-string": (_set("data", "length", "3"), 'data.length = "3"'),  # was: accepted
    "momentum-one": (_set("optimizer", "momentum", 1.0), "optimizer.momentum = 1.0"),
    "whole-sequence-chunk-index": (_set("state", "chunk", 2), "state.chunk = 2"),  # was: accepted
}


@pytest.mark.parametrize("case", list(COPY_CASES))
def test_each_malformed_copy_task_field_is_refused_naming_the_field(tmp_path, copy_ck, case):
    edit, names = COPY_CASES[case]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_rewrite(copy_ck, tmp_path / "bad.npz", meta=edit), backend="numpy")
    assert names in str(info.value)


ARRAY_CASES = {  # id: (changed entries, what the message must name)
    "history-loss-2d": ({"history.loss": np.zeros((5, 2))}, "history.loss"),
    "history-loss-strings": ({"history.loss": np.array(["a"] * 5)}, "history.loss"),  # was: accepted
    "history-lr-nan": ({"history.lr": np.full(5, np.nan)}, "history.lr"),  # was: accepted
    "history-step-beyond-state": ({"history.step": np.arange(1, 6) + 100}, "history.step"),  # was: accepted
    "history-accuracy-above-1": ({"history.eval_accuracy": np.full(4, 2.0)}, "history.eval_accuracy"),  # was: accepted
    "history-skipped-missing": ({"history.skipped": None}, "history.skipped is missing"),
    "history-skipped-1d": ({"history.skipped": np.zeros(2, dtype=np.int64)}, "history.skipped"),
    "history-lengths": ({"history.grad_norm": np.zeros(3)}, "'grad_norm': 3"),
    "history-unknown": ({"history.extra": np.zeros(3)}, "history.extra"),  # was: accepted
    "carry-1d": ({"carry.s": np.zeros(8, dtype=np.float32)}, "carry.s"),
}


@pytest.mark.parametrize("case", list(ARRAY_CASES))
def test_each_malformed_array_entry_is_refused_naming_the_entry(tmp_path, text_ck, case):
    changes, names = ARRAY_CASES[case]
    if case == "history-accuracy-above-1":
        changes = {"history.eval_accuracy": np.full(len(_arrays(text_ck)["history.eval_step"]), 2.0)}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_rewrite(text_ck, tmp_path / "bad.npz", changes=changes), backend="numpy")
    assert names in str(info.value)


def test_a_carried_state_at_the_start_of_a_sequence_is_refused(tmp_path, text_ck):
    path = _rewrite(text_ck, tmp_path / "bad.npz", meta=_set("state", "chunk", 0))
    with pytest.raises(CheckpointError, match=r"carry\.s is present at state\.chunk = 0"):
        load_checkpoint(path, backend="numpy")


def test_several_problems_are_listed_one_line_each(tmp_path, text_ck):
    def edit(meta):
        meta["state"]["step"], meta["model"]["bias"], meta["config"]["lr"] = -1, "no", "fast"
        return meta

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_rewrite(text_ck, tmp_path / "bad.npz", meta=edit), backend="numpy")
    lines = str(info.value).splitlines()
    assert "3 problems" in lines[0] and len(lines) == 4
    for field, line in zip(("model.bias", "config.lr", "state.step"), lines[1:], strict=True):
        assert line.strip().startswith(field)


def test_a_zip_member_that_is_not_an_array_is_refused(tmp_path, text_ck):
    path = tmp_path / "bad.npz"
    path.write_bytes(text_ck.read_bytes())
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", "hello")  # was: bytes handed on as if an array
    with pytest.raises(CheckpointError, match=r"entry 'notes\.txt' is not a NumPy array"):
        load_checkpoint(path, backend="numpy")


def test_pickled_data_is_refused_without_suggesting_to_unpickle(tmp_path, text_ck):
    obj = _rewrite(text_ck, tmp_path / "obj.npz", changes={"vocab": np.array([{"a": 1}], dtype=object)})
    text = tmp_path / "notes.npz"
    text.write_text("just some text\n")
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.arange(3))
    pickled_npy = tmp_path / "objects.npz"
    with open(pickled_npy, "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for path, names in [(obj, "'vocab'"), (text, "not an .npz"), (npy, "single .npy array"), (pickled_npy, ".npy")]:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, backend="numpy")
        message = str(info.value)
        assert names in message, message
        assert "allow_pickle" not in message and "pickle.load" not in message and "unsafe" not in message


@pytest.mark.parametrize(
    "case", ["meta-is-a-list", "optimizer-string", "step-negative", "sequence-negative", "bias-no"]
)
def test_cli_reports_a_malformed_checkpoint_as_an_error_line(tmp_path, text_ck, case):
    path = _rewrite(text_ck, tmp_path / "bad.npz", meta=META_CASES[case][0])
    raw = path.read_bytes()
    runner = CliRunner()
    commands = [
        ["train", "--resume", "--checkpoint", str(path), "--backend", "numpy"],
        ["sample", "--checkpoint", str(path), "--length", "5"],
        ["vanish", "--checkpoint", str(path), "--backend", "numpy"],
    ]
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.output.startswith("error: ") and "Traceback" not in result.output
        assert META_CASES[case][1].split(" =")[0] in result.output
    assert path.read_bytes() == raw


def test_save_refuses_what_load_would_refuse_and_keeps_the_old_file(tmp_path, text_ck):
    ck = load_checkpoint(text_ck, backend="numpy")
    path = tmp_path / "ck.npz"
    path.write_bytes(text_ck.read_bytes())
    raw = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"history\.step"):  # a history of 5 steps at step 0
        save_checkpoint(path, ck.model, optimizer=ck.optimizer, vocab=ck.vocab, data=ck.data, history=ck.history)
    with pytest.raises(CheckpointError, match=r"data\.val_fraction = 2"):
        save_checkpoint(path, ck.model, data={**ck.data, "val_fraction": 2}, vocab=ck.vocab)
    assert path.read_bytes() == raw and sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_a_data_description_of_the_callers_own_is_kept_and_never_resumed(tmp_path):
    model = gpubptt.RNN(5, 4, 5, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model)
    path = save_checkpoint(tmp_path / "own.npz", model, optimizer=opt, data={"name": "mine", "rows": 3},
                           config=TrainConfig(steps=2, batch_size=2))  # fmt: skip
    ck = load_checkpoint(path, backend="numpy")
    assert ck.data == {"name": "mine", "rows": 3}
    from gpubptt.training.run import resume_run

    with pytest.raises(gpubptt.InputError, match="holds a model but no training run to resume"):
        resume_run(path, backend="numpy")


def test_a_relu_model_round_trips_and_samples_with_relu(tmp_path):
    from gpubptt.training.sample import sample_text
    from tests.reference import phi

    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 6, data.output_size, backend="numpy", dtype="float64", seed=1,
                        nonlinearity="relu", bias=True, init="torch")  # fmt: skip
    path = save_checkpoint(tmp_path / "relu.npz", model, vocab=data.vocab, data=data.spec())
    assert json.loads(str(_arrays(path)["meta"]))["model"]["nonlinearity"] == "relu"
    ck = load_checkpoint(path, backend="numpy")
    assert ck.model.nonlinearity == "relu" and "nonlinearity='relu'" in repr(ck.model)
    x = np.arange(12).reshape(4, 3) % data.input_size
    np.testing.assert_array_equal(ck.model.forward(x).states, model.forward(x).states)
    # sampling runs the model's own recurrence: the relu loop, written out, draws the same text
    p = {k: np.asarray(v) for k, v in model.params.items()}
    rng, s, ids = np.random.default_rng(5), np.zeros(6), list(data.vocab.encode("the "))
    for i in ids[:-1]:
        s = phi(p["U"][:, i] + p["W"] @ s + p["b"], "relu")
    out, xi = [], ids[-1]
    for _ in range(20):
        s = phi(p["U"][:, xi] + p["W"] @ s + p["b"], "relu")
        z = p["V"] @ s + p["c"]
        q = np.exp(z - z.max())
        xi = int(rng.choice(len(q), p=q / q.sum()))
        out.append(xi)
    assert sample_text(ck.model, ck.vocab, length=20, seed=5, prime="the ") == "the " + data.vocab.decode(out)


def test_cell_options_a_surrogate_vocabulary_and_an_indrnn_w_beyond_its_bound_are_refused(tmp_path, text_ck):
    bad = _rewrite(text_ck, tmp_path / "phi.npz", meta=_set("model", "cell_options", {"nonlinearity": "relu"}))
    with pytest.raises(CheckpointError, match="may not hold nonlinearity"):  # was: TypeError from make_cell
        load_checkpoint(bad, backend="numpy")
    vocab = _arrays(text_ck)["vocab"].copy()
    vocab[0] = 0xD800
    bad = _rewrite(text_ck, tmp_path / "surrogate.npz", changes={"vocab": vocab})
    with pytest.raises(CheckpointError, match="surrogate code point U\\+D800"):  # was: a crash in sample
        load_checkpoint(bad, backend="numpy")
    result = CliRunner().invoke(app, ["info", "--checkpoint", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    from gpubptt.cells.indrnn import IndRNNCell

    model = gpubptt.RNN(3, 4, 3, cell=IndRNNCell("relu", max_weight=0.5), backend="numpy", seed=0)
    save_checkpoint(tmp_path / "ind.npz", model)
    model.params["w"] = np.full(4, 2.0)  # set by hand past the bound: refused when saved, not only when loaded
    with pytest.raises(CheckpointError, match=r"beyond the cell's max_weight = 0\.5.*model\.constrain\(\)"):
        save_checkpoint(tmp_path / "ind.npz", model)
    model.constrain()
    save_checkpoint(tmp_path / "clipped.npz", model)
    big = _rewrite(
        tmp_path / "ind.npz", tmp_path / "huge.npz", meta=_set("model", "cell_options", "max_weight", 10**400)
    )
    with pytest.raises(CheckpointError, match="max_weight must be None or a finite number"):  # was: OverflowError
        load_checkpoint(big, backend="numpy")
    w = _arrays(tmp_path / "ind.npz")["param.w"].copy()
    w[1] = 3.0  # beyond the bound training keeps it within
    out = _rewrite(tmp_path / "ind.npz", tmp_path / "outside.npz", changes={"param.w": w})
    with pytest.raises(CheckpointError, match=r"parameter w has \|w\| up to 3\.0, beyond the cell's max_weight = 0\.5"):
        load_checkpoint(out, backend="numpy")
    tenth = gpubptt.RNN(3, 4, 3, cell=IndRNNCell("relu", max_weight=0.1), backend="numpy", seed=0)
    tenth.params["w"] = np.full(4, 5.0)
    tenth.constrain()  # float32(0.1) = 0.10000000149 > 0.1: the bound as the dtype rounds it is within
    save_checkpoint(tmp_path / "edge.npz", tenth)
    assert load_checkpoint(tmp_path / "edge.npz", backend="numpy").model.params["w"].max() == np.float32(0.1)
