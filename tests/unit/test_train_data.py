"""Training data: synthetic stream, token files (.npy, .bin, .mindrecord), batches per (step, dp rank)."""
import numpy as np
import pytest

from mf_longseq.parallel import Mesh, shard_sequence
from mf_longseq.train.data import (ArrayTokens, SyntheticTokens, batch_for_step, default_bin_dtype, open_source,
                                   read_token_file)


def test_synthetic_is_a_pure_function_of_seed_and_index():
    a, b = SyntheticTokens(64, 31, seed=3), SyntheticTokens(64, 31, seed=3)
    assert np.array_equal(a.sample(7), b.sample(7))
    assert a.sample(7).shape == (32,)
    assert not np.array_equal(a.sample(7), a.sample(8))
    assert not np.array_equal(a.sample(7), SyntheticTokens(64, 31, seed=4).sample(7))
    assert a.sample(5).min() >= 0 and a.sample(5).max() < 64


def test_synthetic_follows_its_transition_table():
    src = SyntheticTokens(50, 2000, seed=1, branching=4, noise=0.1)
    tok = src.sample(0)
    follows = np.array([tok[t] in src.successors[tok[t - 1]] for t in range(1, len(tok))])
    assert 0.85 < follows.mean() <= 1.0          # 90% table moves, plus noise landing in the table by chance


def test_batch_labels_are_shifted_globally_before_sharding():
    src = SyntheticTokens(100, 16, seed=0)
    batch = batch_for_step(src, 2, batch_size=2)
    tokens = np.stack([src.sample(4), src.sample(5)])             # (step 2, dp 1): samples 4 and 5
    assert np.array_equal(batch.input_ids, tokens[:, :-1]) and np.array_equal(batch.labels, tokens[:, 1:])
    assert batch.input_ids.dtype == np.int32 and batch.loss_mask.dtype == np.float32
    assert batch.num_tokens == 32
    # every CP rank of a zigzag split holds the global successor of each of its tokens
    for cp_id in range(2):
        mesh = Mesh(cp=2, rank=cp_id)
        ids, labels = (shard_sequence(x, mesh, "zigzag", seq_dim=1) for x in (batch.input_ids, batch.labels))
        from mf_longseq.parallel import global_positions
        pos = global_positions(16, mesh, "zigzag")
        assert np.array_equal(labels, tokens[:, pos + 1]) and np.array_equal(ids, tokens[:, pos])


def test_batches_differ_across_dp_and_cover_disjoint_samples():
    src = SyntheticTokens(1000, 8, seed=0)
    seen = set()
    for step in range(3):
        for dp_id in range(2):
            b = batch_for_step(src, step, batch_size=2, dp=2, dp_id=dp_id)
            for row in b.input_ids:
                seen.add(row.tobytes())
    assert len(seen) == 12


def test_pad_labels_are_masked():
    tokens = np.array([[5, 0, 3, 0, 9]])
    b = batch_for_step(ArrayTokens(tokens, 4), 0, batch_size=1, pad_token_id=0)
    assert b.loss_mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_stream_windows_and_wraparound():
    stream = np.arange(23)
    src = ArrayTokens(stream, 5)                                   # windows [0..5], [5..10], ... (4 of them)
    assert len(src) == 4
    assert src.sample(1).tolist() == [5, 6, 7, 8, 9, 10]
    assert src.sample(4).tolist() == src.sample(0).tolist()


def test_short_rows_are_read_as_a_stream():
    rows = np.arange(30).reshape(10, 3)
    assert ArrayTokens(rows, 5).sample(1).tolist() == list(range(5, 11))


@pytest.mark.parametrize("fmt", ["npy", "bin", "mindrecord"])
def test_token_files(tmp_path, fmt):
    rows = (np.arange(4 * 9).reshape(4, 9) % 50).astype(np.int32)
    path = tmp_path / f"tokens.{fmt}"
    if fmt == "npy":
        np.save(path, rows)
    elif fmt == "bin":
        rows.reshape(-1).astype(np.uint16).tofile(path)
    else:
        from mindspore.mindrecord import FileWriter
        writer = FileWriter(str(path), shard_num=1, overwrite=True)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "tokens")
        writer.write_raw_data([{"input_ids": r} for r in rows])
        writer.commit()
    src = open_source(str(path), vocab_size=50, seq_length=8)
    expected = rows if fmt != "bin" else rows.reshape(-1)[:9][None]
    assert src.sample(0).tolist() == expected[0].tolist()
    if fmt != "bin":
        assert len(src) == 4 and src.sample(3).tolist() == rows[3].tolist()
    else:
        assert src.sample(1).tolist() == rows.reshape(-1)[8:17].tolist()


def test_bin_dtype_default_follows_vocab():
    assert default_bin_dtype(32000) == "uint16" and default_bin_dtype(151936) == "int32"


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p / "t.npy", np.array([1, 2, 70, 3])), r"--data .*t\.npy: token id 70 >= "
     r"model\.model_config\.vocab_size = 50\. Fix"),
    (lambda p: np.save(p / "t.npy", np.array([1, 2])), r"do not make one sample of seq_length \+ 1 = 4 tokens"),
    (lambda p: np.save(p / "t.npy", np.zeros((2, 2, 2), int)), r"expected a 1-D token stream or a 2-D"),
])
def test_data_errors_name_the_flag_and_fix(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(ValueError, match=match):
        open_source(str(tmp_path / "t.npy"), vocab_size=50, seq_length=3)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ValueError, match=r"no such file"):
        read_token_file(str(tmp_path / "nope.npy"))
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"unknown suffix '\.txt'. Fix: use one of \.npy, \.bin, \.mindrecord"):
        read_token_file(str(tmp_path / "x.txt"))
