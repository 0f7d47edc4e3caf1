"""``train_dataset.data_loader.dataset_dir`` for ``mf-longseq train``, read through MindFormers' dataset builder.

The samples, their order (``shuffle``, seeded by the dataset's ``seed``) and the dp sharding are those of the
Trainer route (``run_mindformer.py``): the same ``LongSeqCausalLanguageModelDataset`` with ``dp_shard = (dp_id,
dp)`` and ``batch_size = runner_config.batch_size``.  Batch k of this dp rank's iterator is the batch of update k;
it holds whole samples of seq_length + 1 tokens (the trainer shifts and shards them).  At the end of the data
the iterator starts again (epochs repeat).  The MindRecord must hold an ``input_ids`` column (checked before the
dataset is built) of seq_length + 1 tokens per row.  Before the first step the source refuses, naming dataset_dir:
no rows or fewer than one batch (batch_size x data_parallel), and in the batches the run reads (at most one
epoch, ``mf_dataset.scan_dataset``) a row of another length, an id outside [0, vocab_size), an all-padding row.
"""
import os
import re
from typing import Optional

import numpy as np

from mf_longseq.train.columns import check_pretraining_rows

KEY = "train_dataset.data_loader.dataset_dir"


def _mindrecords(path: str) -> list:
    """The MindRecord files of ``path`` (the file itself, or every *.mindrecord* under a directory), sorted."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                  if re.search(r"mindrecord\d*$", name))


def _first_mindrecord(path: str):
    """The file MindFormers reads first under ``path`` (the file itself, or the first *.mindrecord* in a dir)."""
    found = _mindrecords(path)
    return found[0] if found else None


def row_count(path: str) -> int:
    """Rows of the MindRecord files of ``path`` (their headers; no row is read)."""
    import mindspore.dataset as ds
    files = _mindrecords(path)
    return ds.MindDataset(files if len(files) > 1 else files[0]).get_dataset_size() if files else 0


def check_input_ids_column(path: str) -> None:
    """Refuse a MindRecord (file or directory) without the ``input_ids`` column, naming ``dataset_dir``.

    Raises:
        ValueError: no MindRecord under ``path``, or its schema lacks ``input_ids``.
    """
    from mindspore.mindrecord import FileReader
    first = _first_mindrecord(path)
    if first is None:
        raise ValueError(f"{KEY} = {path!r}: no MindRecord file (*.mindrecord) there. Fix: give a .mindrecord file "
                         "or a directory of them.")
    reader = FileReader(first)
    try:
        columns = sorted(reader.schema())
    finally:
        reader.close()
    if "input_ids" not in columns:
        raise ValueError(f"{KEY} = {path!r}: {first} has no input_ids column (columns: {columns}). Fix: write the "
                         "tokens in a column named input_ids (MindFormers' causal-LM format, rows of seq_length + 1 "
                         "tokens).")


class DatasetDirTokens:
    """Token source over MindFormers' dataset of one dp rank (``sample(index)`` in ``batch_for_step`` order).

    Args:
        settings: the run's ``RunSettings`` (``check_run``); ``settings.data.train_dataset`` is the section
            MindFormers' dataset builder gets.
        dp_id, dp: this rank's data-parallel coordinate and degree.
        batch_size: samples per dp rank per step.
        seq_length: ``model.model_config.seq_length``; every row must hold seq_length + 1 tokens.
        vocab_size, pad_token_id: the model's; every id must be below vocab_size, every row must have a label
            other than pad_token_id.
        steps: updates the run makes (the batches scanned before the first step: at most one epoch).

    Raises:
        ValueError: naming ``train_dataset.data_loader.dataset_dir`` when the MindRecord has no ``input_ids``
        column, no rows or fewer than one batch (batch_size x dp), or a row of the scanned batches is not
        seq_length + 1 tokens long, holds an id outside [0, vocab_size) or only padding
        (``mf_dataset.scan_dataset``: cost one extra read of those batches, no device work).

    ``sample`` must be asked in increasing step order (the trainer does; resuming at step s reads past the first
    s batches).
    """

    kind = "dataset_dir"

    def __init__(self, settings, *, dp_id: int, dp: int, batch_size: int, seq_length: int,
                 vocab_size: Optional[int] = None, pad_token_id: Optional[int] = None, steps: Optional[int] = None):
        from mindformers.dataset import build_dataset
        from mindformers.tools.register import MindFormerConfig
        from mf_longseq.train.mf_dataset import LongSeqCausalLanguageModelDataset  # noqa: F401  (registered)
        from mf_longseq.train.mf_dataset import data_check_of, scan_dataset
        section = settings.data.dataset_section()
        section["batch_size"] = batch_size
        self.path = section["data_loader"]["dataset_dir"]
        check_input_ids_column(self.path)
        rows = row_count(self.path)
        if rows < batch_size * dp:
            raise ValueError(f"{KEY} = {self.path!r}: {rows} rows, fewer than one batch of runner_config.batch_size "
                             f"x data_parallel = {batch_size} x {dp} = {batch_size * dp}. Fix: write more rows "
                             "(MindFormers' causal-LM format), or lower runner_config.batch_size.")
        check = {**data_check_of(settings, batch_size=batch_size, dp=dp, max_batches=steps),
                 "seq_length": seq_length, "vocab_size": vocab_size, "pad_token_id": pad_token_id}
        task = MindFormerConfig(type="LongSeqCausalLanguageModelDataset", dataset_config=MindFormerConfig(**section))
        self.dataset = build_dataset(task, default_args={"dp_shard": (dp_id, dp)})
        scan_dataset(self.dataset, **check)                      # before the first step
        self.dp, self.batch_size, self.seq_length = dp, batch_size, seq_length
        self.batches = self.dataset.get_dataset_size()
        self._iterator, self._step, self._rows = None, -1, None
        self._rows, self._step = self._next_rows(), 0            # the first batch: a wrong length stops here

    def __len__(self) -> int:
        return self.batches * self.batch_size * self.dp

    def _next_rows(self) -> np.ndarray:
        for _ in range(2):                      # the end of an epoch: one new iterator (never a recursion)
            if self._iterator is None:
                self._iterator = self.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
            try:
                rows = np.asarray(next(self._iterator)[0])
            except StopIteration:
                self._iterator = None
                continue
            check_pretraining_rows(rows.shape, self.seq_length, where=f"{KEY} {self.path}: input_ids")
            return rows
        raise ValueError(f"{KEY} = {self.path!r}: the dataset gave no batch of runner_config.batch_size = "
                         f"{self.batch_size} rows. Fix: write more rows, or lower runner_config.batch_size.")

    def sample(self, index: int) -> np.ndarray:
        """Tokens (seq_length + 1,) int64 of sample ``index`` = (step * dp + dp_id) * batch_size + b."""
        step, b = index // (self.dp * self.batch_size), index % self.batch_size
        if step < self._step:
            raise ValueError(f"sample {index}: step {step} was already read (steps must be asked in order)")
        while self._step < step:
            self._rows, self._step = self._next_rows(), self._step + 1
        return self._rows[b].astype(np.int64)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "batches": self.batches}


__all__ = ["DatasetDirTokens", "check_input_ids_column"]
