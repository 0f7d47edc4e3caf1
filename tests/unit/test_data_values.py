"""Bad data values are refused before the first step, naming the data and the fix (issue 20 items 3, 7, 9).

Routes: ``--data`` (train/data.py), ``dataset_dir`` (train/mf_data.py, through MindFormers' dataset builder and
``mf_dataset.scan_dataset``), MindFormers' columns (train/columns.py, what the model checks on the Trainer
route before the step's device work).  On today's main negative ids wrap round in the CPU gather, label -100
trains towards a real token, ids >= vocab_size surface at the step that draws them, an all-padding sample ends
the run at that step, and a dataset smaller than one batch recurses until threads run out.
"""
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from mf_longseq.train.job import JobOptions, run_job

from test_train_runner import SEQ, VOCAB, bigram_factory, job_tree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def dataset_tree(path, batch_size=1, **model):
    tree = job_tree(runner_config={"batch_size": batch_size})
    tree["model"]["model_config"].update(model)
    tree["train_dataset"] = {"data_loader": {"type": "MindDataset", "dataset_dir": str(path), "shuffle": False},
                             "input_columns": ["input_ids"], "num_parallel_workers": 1, "drop_remainder": True,
                             "python_multiprocessing": False}
    tree["train_dataset_task"] = {"type": "LongSeqCausalLanguageModelDataset"}
    return tree


def rows(n, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, (n, SEQ + 1)).astype(np.int32)


def run(tree, steps=4, **opts):
    stream = io.StringIO()
    try:
        run_job(JobOptions(config=tree, steps=steps, **opts), model_factory=bigram_factory, stream=stream)
    finally:
        assert "step 1/" not in stream.getvalue(), "refused only after a step ran"


@pytest.mark.parametrize("row, value, match", [
    (3, VOCAB + 5, rf"input_ids\[0, 7\] = {VOCAB + 5}: a token id must be in \[0, model.model_config.vocab_size = "
                   rf"{VOCAB}\)"),
    (2, -3, r"input_ids\[0, 7\] = -3: a token id must be in \[0, "),
])
def test_dataset_dir_ids_outside_the_vocabulary_are_found_before_the_first_step(tmp_path, row, value, match):
    from mf_route import write_tokens
    data = rows(6)
    data[row, 7] = value
    path = write_tokens(tmp_path / "d.mindrecord", data)
    with pytest.raises(ValueError, match=rf"train_dataset.data_loader.dataset_dir {path}: batch {row} \(update "
                                         rf"{row + 1} of an epoch\), {match}.*Fix: use data tokenized"):
        run(dataset_tree(path))


def test_dataset_dir_all_padding_row_is_refused_before_the_first_step(tmp_path):
    from mf_route import write_tokens
    data = rows(4)
    data[2, 1:] = 0
    path = write_tokens(tmp_path / "d.mindrecord", data)
    with pytest.raises(ValueError, match=r"batch 2 \(update 3 of an epoch\), row 0: no label counts \(every label is "
                                         r"model.model_config.pad_token_id = 0.*Fix: drop all-padding rows"):
        run(dataset_tree(path, pad_token_id=0))


@pytest.mark.parametrize("n, match", [
    (0, r"0 rows, fewer than one batch of runner_config.batch_size x data_parallel = 2 x 1 = 2"),
    (1, r"1 rows, fewer than one batch of runner_config.batch_size x data_parallel = 2 x 1 = 2"),
])
def test_dataset_dir_smaller_than_one_batch_or_empty_is_named(tmp_path, n, match):
    """Today's main: the empty MindRecord fails inside MindSpore ("unexpected error"), one row recurses."""
    from mindspore.mindrecord import FileWriter
    from mf_route import write_tokens
    path = str(tmp_path / "d.mindrecord")
    if n:
        write_tokens(path, rows(n))
    else:
        writer = FileWriter(path, 1, overwrite=True)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "tokens")
        writer.commit()
    with pytest.raises(ValueError, match=rf"train_dataset.data_loader.dataset_dir = '{path}': {match}\. Fix: write "
                                         "more rows"):
        run(dataset_tree(path, batch_size=2))


def test_data_file_all_padding_sample_is_refused_before_the_first_step(tmp_path):
    data = rows(5)
    data[3, 1:] = 0
    np.save(tmp_path / "t.npy", data)
    tree = job_tree()
    tree["model"]["model_config"]["pad_token_id"] = 0
    with pytest.raises(ValueError, match=r"--data .*t\.npy: sample 3 \(1 of 5 samples\) has no label that counts: "
                                         r"every label is model.model_config.pad_token_id = 0\. Fix: drop"):
        run(tree, steps=3, data=str(tmp_path / "t.npy"))


def test_mindformers_columns_are_checked_and_minus_100_is_ignored():
    from mf_longseq.train.columns import whole_batch
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, (2, SEQ)).astype(np.int32)
    labels = rng.integers(1, VOCAB, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.float32)
    labels[1, 4] = -100
    _, got_labels, got_mask = whole_batch(SEQ, None, ids, labels, mask, vocab_size=VOCAB)
    assert got_mask[1, 4] == 0 and got_labels[1, 4] == 0 and got_mask.sum() == 2 * SEQ - 1
    cases = [("labels", -7, r"labels\[1, 4\] = -7: a token id must be in \[0, model.model_config.vocab_size = "
                            rf"{VOCAB}\) or -100 \(ignored\)"),
             ("labels", VOCAB, rf"labels\[1, 4\] = {VOCAB}: "),
             ("input_ids", -1, r"input_ids\[1, 4\] = -1: "),
             ("loss_mask", np.nan, r"loss_mask\[1, 4\] = nan: loss_mask must be finite and >= 0"),
             ("loss_mask", np.inf, r"loss_mask\[1, 4\] = inf: "),
             ("loss_mask", -1.0, r"loss_mask\[1, 4\] = -1.0: ")]
    for column, value, match in cases:
        cols = {"input_ids": ids.copy(), "labels": labels.copy(), "loss_mask": mask.copy()}
        cols[column][1, 4] = value
        with pytest.raises(ValueError, match=match):
            whole_batch(SEQ, None, cols["input_ids"], cols["labels"], cols["loss_mask"], vocab_size=VOCAB)
    tokens = rng.integers(1, VOCAB, (2, SEQ + 1)).astype(np.int32)
    tokens[0, 3] = VOCAB + 1
    with pytest.raises(ValueError, match=rf"input_ids\[0, 3\] = {VOCAB + 1}: a token id must be in"):
        whole_batch(SEQ, None, tokens, vocab_size=VOCAB)


def test_base_config_with_a_python_tag_is_a_config_error(tmp_path):
    from mf_longseq.config import ConfigError
    from mf_longseq.train.validation import load_tree
    (tmp_path / "evil.yaml").write_text('seed: 1\nx: !!python/object/apply:os.system ["echo pwned"]\n')
    (tmp_path / "top.yaml").write_text("base_config: evil.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"base_config = 'evil.yaml': .*evil.yaml line 2: the tag "
                                          r"'tag:yaml.org,2002:python/object/apply:os.system' is not plain YAML.*"
                                          r"Fix: remove the tag"):
        load_tree(str(tmp_path / "top.yaml"))
