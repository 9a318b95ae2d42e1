"""Checkpoints: round trips, exact resume, atomic writes, and clear errors on bad files."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

import gpubptt
from gpubptt.training.data import TextData
from gpubptt.training.loop import TrainConfig, TrainState, train
from gpubptt.training.optim import make_optimizer
from gpubptt.training.record import CheckpointError, load_checkpoint, save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


def _trained(be, steps=4, optimizer="adam", **arch):
    data = TextData(TEXT)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, backend=be, bias=True, seed=0, **arch)
    opt = make_optimizer(optimizer, model, momentum=0.9 if optimizer == "sgd" else 0)
    config = TrainConfig(steps=steps, batch_size=3, chunk=6, eval_every=2)
    state, history = train(model, data, opt, config)
    return data, model, opt, config, state, history


def _save(path, data, model, opt, config, state, history):
    return save_checkpoint(
        path, model, optimizer=opt, vocab=data.vocab, data=data.spec(), config=config, state=state, history=history
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_round_trip_restores_everything(tmp_path, optimizer):
    data, model, opt, config, state, history = _trained("numpy", optimizer=optimizer)
    path = _save(tmp_path / "ck.npz", data, model, opt, config, state, history)
    ck = load_checkpoint(path, backend="numpy")
    for k, v in model.params.items():
        np.testing.assert_array_equal(ck.model.params[k], v)
        assert ck.model.params[k].dtype == np.float32
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(ck.optimizer.state_dict()[k], v)
    assert type(ck.optimizer) is type(opt) and ck.optimizer.hyperparameters() == opt.hyperparameters()
    assert ck.vocab == data.vocab and ck.config == config and ck.data == data.spec()
    assert (ck.state.step, ck.state.sequence, ck.state.chunk) == (state.step, state.sequence, state.chunk)
    np.testing.assert_array_equal(ck.state.s, state.s)
    assert ck.history == history
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: nothing needs pickle
        assert all(z[k].dtype != object for k in z.files)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model = _trained("numpy", steps=9)[1]  # 9 steps straight
    d2, m2, o2, c2, s2, h2 = _trained("numpy", steps=5)  # 5 steps, saved mid-sequence, then 4 more
    assert s2.s is not None  # a carried state is part of the checkpoint
    _save(tmp_path / "ck.npz", d2, m2, o2, c2, s2, h2)
    ck = load_checkpoint(tmp_path / "ck.npz", backend="numpy")
    cfg = TrainConfig(**{**vars(ck.config), "steps": 9})
    train(ck.model, d2, ck.optimizer, cfg, state=ck.state, history=ck.history)
    for k, v in model.params.items():
        np.testing.assert_array_equal(ck.model.params[k], v)


@pytest.mark.parametrize(
    "arch", [dict(num_layers=3, dropout=0.3), dict(num_layers=2, bidirectional=True, nonlinearity="relu")]
)
def test_a_deep_run_round_trips_and_resumes_exactly_dropout_masks_included(tmp_path, arch):
    model = _trained("numpy", steps=9, **arch)[1]
    d2, m2, o2, c2, s2, h2 = _trained("numpy", steps=5, **arch)
    assert s2.s.shape == (m2.num_states, c2.batch_size, 8)  # torch's (L·dirs, B, H) carried state
    _save(tmp_path / "ck.npz", d2, m2, o2, c2, s2, h2)
    ck = load_checkpoint(tmp_path / "ck.npz", backend="numpy")
    assert (ck.model.num_layers, ck.model.bidirectional, ck.model.dropout, ck.model.nonlinearity) == (
        m2.num_layers, m2.bidirectional, m2.dropout, m2.nonlinearity,
    )  # fmt: skip
    assert list(ck.model.params) == list(m2.params)
    np.testing.assert_array_equal(ck.state.s, s2.s)
    cfg = TrainConfig(**{**vars(ck.config), "steps": 9})
    train(ck.model, d2, ck.optimizer, cfg, state=ck.state, history=ck.history)
    for k, v in model.params.items():
        np.testing.assert_array_equal(ck.model.params[k], v)


def test_truncated_and_corrupt_files_give_a_clear_error(tmp_path):
    path = _save(tmp_path / "ck.npz", *_trained("numpy", steps=2))
    raw = path.read_bytes()
    (tmp_path / "short.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not a readable gpubptt checkpoint"):
        load_checkpoint(tmp_path / "short.npz")
    flipped = bytearray(raw)
    mid = len(raw) // 3
    flipped[mid : mid + 64] = bytes(64)
    (tmp_path / "bad.npz").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "text.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    assert path.read_bytes() == raw


def _rewrite(src, dst, **changes):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    np.savez(dst, **arrays)
    return dst


def test_wrong_names_shapes_and_dtypes_are_refused(tmp_path):
    src = _save(tmp_path / "ck.npz", *_trained("numpy", steps=2))
    with np.load(src) as z:
        W = z["param.W"]
    cases = {
        "parameter W has shape": {"param.W": W[:, :-1]},
        "parameter W has dtype float64": {"param.W": W.astype(np.float64)},
        "missing parameter V": {"param.V": None},
        "unexpected entry 'extra'": {"extra": np.zeros(2)},
        "NaN": {"param.W": np.full_like(W, np.nan)},
        "bad optimizer state": {"optim.m.U": np.zeros((1, 1), dtype=np.float32)},
        "no 'meta' entry": {"meta": None},
        "vocabulary has": {"vocab": np.arange(97, 100, dtype=np.int32)},
    }
    for i, (message, change) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(_rewrite(src, tmp_path / f"case{i}.npz", **change))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    src = _save(tmp_path / "ck.npz", *_trained("numpy", steps=2))
    path = _rewrite(src, tmp_path / "obj.npz", vocab=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = _save(tmp_path / "ck.npz", *_trained("numpy", steps=2))
    raw = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    data, model, opt, config, state, history = _trained("numpy", steps=3)
    with pytest.raises(OSError, match="disk full"):
        _save(path, data, model, opt, config, state, history)
    assert path.read_bytes() == raw and sorted(os.listdir(tmp_path)) == ["ck.npz"]
    assert zipfile.is_zipfile(path)


def test_save_into_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _save(tmp_path / "no" / "ck.npz", *_trained("numpy", steps=1))


def test_cupy_checkpoint_loads_on_numpy_and_back(tmp_path, cupy_be):
    data, model, opt, config, state, history = _trained(cupy_be, steps=3)
    path = _save(tmp_path / "gpu.npz", data, model, opt, config, state, history)
    host = load_checkpoint(path, backend="numpy")
    for k, v in model.params.items():
        np.testing.assert_array_equal(host.model.params[k], gpubptt.to_numpy(v))
    _save(tmp_path / "cpu.npz", data, host.model, host.optimizer, config, host.state, host.history)
    back = load_checkpoint(tmp_path / "cpu.npz", backend=cupy_be)
    assert back.model.backend.name == "cupy"
    for k, v in model.params.items():
        np.testing.assert_array_equal(gpubptt.to_numpy(back.model.params[k]), gpubptt.to_numpy(v))
    assert isinstance(back.state, TrainState)


def test_the_file_format_stores_any_training_record_it_is_given_and_refuses_entries_no_one_owns(tmp_path):
    # the format (gpubptt.training.checkpoint) knows only the model; a record of another shape than the
    # training loop's goes through the same interface: its section is checked by its own rule, its entry kept
    from gpubptt.training.checkpoint import read_model_state, write_model_state
    from gpubptt.training.checkpoint_meta import RecordSchema

    def check(f, meta):
        if meta.get("note") is not None:
            f.integer("note.epoch", meta["note"].get("epoch"), 0)

    schema = RecordSchema(("note",), (), check, lambda entry, cell: entry == "extra")
    m = gpubptt.RNN(3, 4, 2, cell="gru", num_layers=2, backend="numpy", dtype="float64", seed=1)
    saved = {k: np.array(v) for k, v in m.params.items()}  # the reference: the arrays as they were
    path = write_model_state(tmp_path / "ck.npz", m, schema, {"note": {"epoch": 3}}, {"extra": np.arange(5)})
    read = read_model_state(path, schema, backend="numpy")
    assert read.meta["note"] == {"epoch": 3} and read.arrays["extra"].tolist() == [0, 1, 2, 3, 4]
    assert read.model.config == m.config and set(read.model.params) == set(saved)
    for k, a in saved.items():
        np.testing.assert_array_equal(read.model.params[k], a)
    with pytest.raises(CheckpointError, match=r"note\.epoch = -1, expected an int ≥ 0"):
        write_model_state(tmp_path / "bad.npz", m, schema, {"note": {"epoch": -1}}, {})
    assert not (tmp_path / "bad.npz").exists()
    other = RecordSchema(("note",), (), check, lambda entry, cell: False)  # a reader that owns no entry
    with pytest.raises(CheckpointError, match=r"unexpected entry 'extra'"):
        read_model_state(path, other, backend="numpy")
