"""The training side's arguments, checked before any work: a single string of ``copies`` (read as one file per
character), a folder as a target, a string flag read as true, NumPy scalars in a checkpoint's description, a
hand-set learning rate, the sampler's and the data's numbers, token ids and names. Refused with a gpubptt error
that names the argument, or taken as the Python number they hold."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re

import numpy as np
import pytest

import gpubptt
from gpubptt._io import write_atomic
from gpubptt.errors import CheckpointError, InputError, InputTypeError
from gpubptt.training.data import CopyTask, TextData, Vocab, default_corpus
from gpubptt.training.loop import TrainConfig, TrainState, evaluate, train
from gpubptt.training.optim import clip_grad_norm, global_grad_norm, make_optimizer
from gpubptt.training.record import load_checkpoint, save_checkpoint
from gpubptt.training.run import new_run, resume_run, save_run
from gpubptt.training.sample import next_distribution, sample_chars, sample_text

RECALL = {"task": "recall", "delay": 3, "hidden": 8}


def _model(K=5):
    return gpubptt.RNN(K, 4, K, backend="numpy", seed=0)


def _contents(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


# -- 1. copies --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("copies", ["best", "best.npz", b"best"])
def test_a_single_string_of_copies_is_refused_and_no_file_is_touched(tmp_path, monkeypatch, copies):
    monkeypatch.chdir(tmp_path)
    for name in "best":  # the files a string read character by character would overwrite
        (tmp_path / name).write_bytes(b"user data " + name.encode())
    before = _contents(tmp_path)
    with pytest.raises(InputTypeError, match=r"copies must be a list .*pass a list"):
        save_checkpoint("last.npz", _model(), copies=copies)
    assert _contents(tmp_path) == before  # no checkpoint, no temporary, every user file as it was


def test_save_run_refuses_a_single_string_of_copies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("keep")
    run = new_run(RECALL, backend="numpy", steps=2)
    with pytest.raises(InputTypeError, match="copies=\\['xy'\\]"):
        save_run("ck.npz", run, copies="xy")
    assert _contents(tmp_path) == {"x": b"keep"}


@pytest.mark.parametrize("write", ["save_checkpoint", "write_atomic"])
def test_a_copy_that_is_a_folder_is_refused_before_any_file_is_replaced(tmp_path, write):
    last, folder = tmp_path / "last.npz", tmp_path / "best.npz"
    last.write_bytes(b"the old checkpoint")
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"copies\[0\] is a folder.*best\.npz'"):
        if write == "save_checkpoint":
            save_checkpoint(last, _model(), copies=[folder])
        else:
            write_atomic(last, b"new", copies=(folder,))
    assert last.read_bytes() == b"the old checkpoint"  # the first target was replaced before the folder failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz", "last.npz"]  # no temporary left


def test_a_checkpoint_path_that_is_a_folder_is_a_destination_error(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(IsADirectoryError, match=r"path is a folder"):
        save_checkpoint(tmp_path / "ck", _model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_copy_in_a_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope/b\.npz'?: directory .*nope' does not exist"):
        save_checkpoint(tmp_path / "a.npz", _model(), copies=[tmp_path / "nope" / "b.npz"])
    assert list(tmp_path.iterdir()) == []


def test_a_list_of_copies_still_writes_every_file(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_checkpoint(a, _model(), copies=[str(b)])
    assert a.read_bytes() == b.read_bytes()


# -- 2. accept_changed_data -------------------------------------------------------------------------------------------
def test_accept_changed_data_must_be_a_bool(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("hello world, this is a text. " * 40)
    save_run("ck.npz", new_run({"data": "t.txt", "hidden": 8, "batch": 2, "chunk": 8}, backend="numpy", steps=3))
    (tmp_path / "t.txt").write_text("world hello, text a is this. " * 40)  # same characters, another text
    with pytest.raises(InputTypeError, match="accept_changed_data must be a bool, got str 'no'"):
        resume_run("ck.npz", backend="numpy", accept_changed_data="no")  # was read as true: resumed on it
    with pytest.raises(InputError, match="has changed since the checkpoint was saved"):
        resume_run("ck.npz", backend="numpy", accept_changed_data=np.bool_(False))
    assert resume_run("ck.npz", backend="numpy", accept_changed_data=True).state.step == 0


# -- 3. NumPy scalars in a checkpoint's description -------------------------------------------------------------------
def test_a_run_of_numpy_steps_saves_and_resumes(tmp_path):
    run = new_run(RECALL, backend="numpy", steps=np.int64(5))
    assert type(run.config.steps) is int and run.config.steps == 5
    save_run(tmp_path / "ck.npz", run)
    assert resume_run(tmp_path / "ck.npz", backend="numpy").config.steps == 5


def test_numpy_scalars_set_later_are_stored_as_python_numbers(tmp_path):
    model, path = _model(), tmp_path / "ck.npz"
    config = TrainConfig()
    config.steps, config.max_norm = np.int64(7), np.float32(0.5)
    opt = make_optimizer("sgd", model)
    opt.lr = np.float32(0.25)
    data = {"x": np.int64(1), "y": [np.float32(0.5), np.bool_(True)]}
    save_checkpoint(path, model, optimizer=opt, config=config, state=TrainState(step=np.int64(3)), data=data)
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["config"]["steps"] == 7 and meta["config"]["max_norm"] == 0.5 and meta["state"]["step"] == 3
    assert meta["optimizer"]["lr"] == 0.25 and meta["data"] == {"x": 1, "y": [0.5, True]}
    ck = load_checkpoint(path, backend="numpy")
    assert ck.config.steps == 7 and ck.state.step == 3 and ck.data == {"x": 1, "y": [0.5, True]}


def test_a_description_json_cannot_hold_is_a_checkpoint_error_naming_the_field(tmp_path):
    with pytest.raises(CheckpointError, match=r"data\.x is object"):
        save_checkpoint(tmp_path / "ck.npz", _model(), data={"x": object()})
    assert list(tmp_path.iterdir()) == []


# -- 4. a hand-set learning rate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lr", "error"),
    [("0.5", InputTypeError), (True, InputTypeError), (-0.1, InputError), (0.0, InputError), (1e9, InputError),
     (math.nan, InputError), (np.array(0.1), InputTypeError)],
)  # fmt: skip
def test_a_hand_set_learning_rate_is_checked_and_a_refused_one_leaves_it(lr, error):
    opt = make_optimizer("sgd", _model(), lr=0.2)
    with pytest.raises(error, match="lr must be"):
        opt.lr = lr
    assert opt.lr == 0.2


def test_a_hand_set_numpy_rate_is_taken_as_a_float_and_trains():
    data = CopyTask(symbols=3, length=1, delay=1)
    model = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model)
    opt.lr = np.float32(0.5)
    assert type(opt.lr) is float and opt.lr == 0.5
    _, history = train(model, data, opt, TrainConfig(steps=2, batch_size=2, chunk=None, lr=None, eval_every=0))
    assert history.lr == [0.5, 0.5]


def test_the_checked_rate_survives_pickle_copies_and_an_older_state_with_lr():
    opt = make_optimizer("adam", _model(), lr=0.01)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt), copy.copy(opt)):
        assert clone.lr == 0.01
        with pytest.raises(InputError):
            clone.lr = -1.0
    state = opt.__getstate__()
    state["lr"] = state.pop("_lr")  # as kept before the rate was a checked property
    old = object.__new__(type(opt))
    old.__setstate__(state)
    assert old.lr == 0.01 and "lr" not in vars(old)
    loaded = make_optimizer("adam", _model(), lr=0.5)
    loaded.load_state_dict(opt.state_dict())
    assert loaded.lr == 0.01


# -- 5. the sampler's numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [False, True])
def test_a_bool_temperature_is_refused(tau):
    v = Vocab.from_text("abcd\n")
    with pytest.raises(InputError, match="temperature must be a number"):
        sample_text(_model(len(v)), v, length=3, temperature=tau)
    with pytest.raises(InputError, match="temperature must be a number"):
        next_distribution(np.array([1.0, 2.0]), temperature=tau)


def test_numpy_temperature_top_p_and_length_are_taken():
    z = np.array([1.0, 2.0, 0.5])
    q = np.exp(z / 0.5)
    np.testing.assert_allclose(next_distribution(z, temperature=np.float32(0.5)), q / q.sum(), rtol=1e-12)
    np.testing.assert_array_equal(next_distribution(z, top_p=np.float32(0.5)), [0.0, 1.0, 0.0])  # the top one: 0.63
    v = Vocab.from_text("abcd\n")
    model = _model(len(v))
    text = sample_text(model, v, length=np.int64(4), temperature=np.float32(0.5), top_p=np.float32(0.5), seed=1)
    assert len(text) == 4 and text == sample_text(model, v, length=4, temperature=0.5, top_p=0.5, seed=1)


@pytest.mark.parametrize("prime", [5, b"ab", ["a", "b"]])
def test_a_prime_that_is_not_a_str_is_refused(prime):
    v = Vocab.from_text("abcd\n")
    with pytest.raises(InputTypeError, match="prime must be a str"):
        sample_chars(_model(len(v)), v, length=3, prime=prime)


# -- 6. token ids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 5, 99, 1.5, True, np.float64(2.0)])
def test_decode_refuses_an_id_outside_the_vocabulary(bad):
    v = Vocab.from_text("abcd\n")
    with pytest.raises(InputError, match=re.escape(f"token id {bad!r} is not an int in [0, 5)")):
        v.decode([0, bad])


def test_decode_takes_python_and_numpy_ints():
    v = Vocab.from_text("abcd\n")
    assert v.chars == "\nabcd"
    assert v.decode([0, np.int64(3), np.uint8(4)]) == "\ncd" and v.decode(np.array([2, 1])) == "ba"


def test_encode_refuses_what_is_not_a_str():
    with pytest.raises(InputTypeError, match="must be a str, got int 5"):
        Vocab.from_text("abc").encode(5)


# -- 7. the other arguments -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_data():
    return TextData(default_corpus(3000))


@pytest.mark.parametrize(("chunk", "error"), [(0, InputError), (2.5, InputTypeError), (True, InputTypeError)])
def test_evaluate_checks_its_chunk(text_data, chunk, error):
    model = _model(text_data.input_size)
    with pytest.raises(error, match="chunk must be"):
        evaluate(model, text_data, chunk=chunk)
    assert evaluate(model, text_data, chunk=np.int64(64)) == evaluate(model, text_data, chunk=64)


@pytest.mark.parametrize("data", ["text", "copy"])
def test_the_data_sets_check_their_batch_size(text_data, data):
    d = text_data if data == "text" else CopyTask()
    with pytest.raises(InputTypeError, match=r"batch_size must be a positive int, got float 2\.5"):
        d.train_sequence(0, seed=0, batch_size=2.5)
    with pytest.raises(InputTypeError, match=r"batch_size must be a positive int, got float 2\.5"):
        d.eval_sequences(batch_size=2.5)
    with pytest.raises(InputError, match="batch_size must be ≥ 1, got 0"):
        d.eval_sequences(batch_size=0)


def test_make_optimizer_refuses_a_list_for_a_name():
    with pytest.raises(InputError, match=r"unknown optimizer \['sgd'\]"):
        make_optimizer(["sgd"], _model())


def test_grad_norms_name_a_missing_gradient_and_change_nothing():
    grads = {k: np.ones_like(v) for k, v in _model().params.items()}
    with pytest.raises(InputError, match=r"names \['nope'\] are not among the gradients"):
        global_grad_norm(grads, xp=np, names=["nope"])
    with pytest.raises(InputError, match=r"names \['nope'\]"):
        clip_grad_norm(grads, 0.1, xp=np, names=["U", "nope"])
    with pytest.raises(InputTypeError, match="names=\\['Uc'\\]"):
        clip_grad_norm(grads, 0.1, xp=np, names="Uc")  # read as "U" and "c"
    assert all((g == 1).all() for g in grads.values())
    assert float(global_grad_norm(grads, xp=np, names=["U"])) == math.sqrt(grads["U"].size)


def test_early_stop_takes_a_numpy_int():
    data = CopyTask(symbols=3, length=1, delay=1)
    config = TrainConfig(steps=50, batch_size=2, chunk=None, eval_every=1, lr=1e-3)
    steps = []
    for patience in (2, np.int64(2)):
        model = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
        state, _ = train(model, data, make_optimizer("sgd", model), config, early_stop=patience)
        steps.append(state.step)
    assert steps[0] == steps[1]
    with pytest.raises(InputError, match="early_stop must be an int ≥ 1"):
        train(model, data, make_optimizer("sgd", model), config, early_stop=np.float64(2.0))


def test_val_fraction_takes_a_numpy_float_and_stores_a_python_float(tmp_path):
    text = default_corpus(3000)
    d = TextData(text, val_fraction=np.float32(0.1))
    assert type(d.val_fraction) is float and len(d.val_ids) == int(len(text) * float(np.float32(0.1)))
    save_checkpoint(tmp_path / "ck.npz", _model(d.input_size), data=d.spec(), vocab=d.vocab)
    assert load_checkpoint(tmp_path / "ck.npz", backend="numpy").data["val_fraction"] == float(np.float32(0.1))
