"""Data: vocabulary, text files, the built-in corpus and the copy/recall tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpubptt
from gpubptt.errors import InputError
from gpubptt.training.data import CopyTask, TextData, Vocab, default_corpus, make_data, read_text


def test_vocab_round_trips_text_and_code_points():
    v = Vocab.from_text("héllo wörld\n")
    assert v.decode(v.encode("wörld héllo")) == "wörld héllo"
    assert Vocab.from_array(v.to_array()) == v and v.to_array().dtype == np.int32


def test_vocab_names_an_unknown_character():
    with pytest.raises(InputError, match="'z' is not in the model's vocabulary"):
        Vocab.from_text("abc").encode("abz")


def test_read_text_reports_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text("naïve ✓\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "naïve ✓\n"


def test_default_corpus_is_deterministic_small_and_structured():
    a, b = default_corpus(5000, seed=3), default_corpus(5000, seed=3)
    assert a == b and a != default_corpus(5000, seed=4)
    assert 5000 <= len(a) <= 5002 and len(set(a)) < 50
    # subject–verb agreement: "the cats see", never "the cats sees"; "the cat sees", never "the cat see"
    big = default_corpus(100_000)
    assert "cats see " in big and "cats sees" not in big
    assert " cat sees" in big and "The cat see " not in big and "The cats see " in big


def test_text_streams_predict_the_next_character():
    text = "".join(chr(ord("a") + i % 7) for i in range(1000))
    data = TextData(text)
    x, y = data.train_sequence(0, seed=0, batch_size=4, chunk=8)
    assert x.shape == y.shape and x.shape[1] == 4
    np.testing.assert_array_equal(y[:-1], x[1:])  # y_t = x_{t+1} along each stream
    assert math.isclose(data.chance_loss, math.log(7)) and math.isclose(data.unigram_loss, math.log(7), rel_tol=1e-3)
    x2, _ = data.train_sequence(0, seed=0, batch_size=4, chunk=8)
    np.testing.assert_array_equal(x, x2)


def test_text_too_short_for_the_batch_is_refused():
    data = TextData("abcdefghij" * 10)
    with pytest.raises(InputError, match="needs at least"):
        data.check_batch(32, 64)


@pytest.mark.parametrize("k", [1, 3])
def test_copy_task_layout_and_closed_form_chance(k):
    task = CopyTask(symbols=5, length=k, delay=4)
    x, y = task.sample(np.random.default_rng(0), 6)
    L = 2 * k + 4
    assert x.shape == y.shape == (L, 6) and task.seq_len == L
    np.testing.assert_array_equal(y[L - k :], x[:k])  # recall the symbols in order
    assert ((x[:k] >= 1) & (x[:k] <= 5)).all() and (x[k + 4] == 6).all()  # symbols, then the go marker
    assert (y[: L - k] == 0).all() and task.score_mask.sum() == k
    assert task.chance_loss == pytest.approx(math.log(5))
    assert task.chance_loss_all_steps == pytest.approx(k * math.log(5) / L)
    assert task.kind == ("recall" if k == 1 else "copy")


def test_make_data_rebuilds_from_spec():
    task = CopyTask(symbols=4, length=2, delay=3)
    again = make_data(task.spec())
    assert again.spec() == task.spec()
    with pytest.raises(InputError, match="unknown data kind"):
        make_data({"kind": "audio"})


def test_make_data_names_missing_task_fields_and_a_vocabulary_refuses_surrogates():
    with pytest.raises(InputError, match="missing symbols, length, delay"):  # was: KeyError
        make_data({"kind": "copy"})
    with pytest.raises(InputError, match="surrogate code point U\\+D800"):  # no UTF-8 text holds one
        Vocab.from_text("ab\ud800")


def test_train_refuses_a_chunk_that_would_drop_a_tasks_targets():
    """train() with chunk 64 on a 110-step copy task trained its first 64 steps only, where no target is."""
    from gpubptt.training.data import CopyTask
    from gpubptt.training.loop import TrainConfig, train
    from gpubptt.training.optim import make_optimizer

    task = CopyTask(symbols=8, length=5, delay=100)  # L = 110
    model = gpubptt.RNN(task.input_size, 8, task.output_size, seed=0, backend="numpy")
    opt = make_optimizer("adam", model)
    with pytest.raises(gpubptt.InputError, match="chunk 64 does not divide the copy task's sequence of 110 steps"):
        train(model, task, opt, TrainConfig(steps=2, batch_size=4, eval_every=0))
    assert opt.t == 0
    for chunk in (None, 55, 110, 200):  # whole sequences, a divisor, longer: every target trains
        train(model, task, make_optimizer("sgd", model), TrainConfig(steps=1, batch_size=2, chunk=chunk, eval_every=0))


def test_batch_seeds_past_32_bits_draw_their_own_batches_and_smaller_ones_draw_as_ever():
    from gpubptt.training.data import CopyTask, TextData
    from gpubptt.training.loop import dropout_seed

    task = CopyTask(symbols=8, length=5, delay=0)
    x = {(s, i): task.train_sequence(i, seed=s, batch_size=64)[0] for s in (0, 2**32, 5 + 7 * 2**32) for i in (0, 1)}
    assert not np.array_equal(x[2**32, 0], x[0, 1])  # [2³², 0] was read as [0, 1, 0]: seed 0's batch 1
    assert len({a.tobytes() for a in x.values()}) == len(x)
    ref = task.sample(np.random.default_rng([3, 4]), 64)[0]  # seeds below 2³²: the batches every run had
    assert np.array_equal(task.train_sequence(4, seed=3, batch_size=64)[0], ref)
    assert dropout_seed(2**32, 0) != dropout_seed(0, 1)
    assert TextData._offset(0, 2**32, 1 << 20) != TextData._offset(1, 0, 1 << 20)


def test_a_one_character_text_prints_its_letter_entropy_as_zero():
    from gpubptt.training.data import TextData

    assert f"{TextData('a' * 200).unigram_loss:.3f}" == "0.000"
