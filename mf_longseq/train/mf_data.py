"""``train_dataset.data_loader.dataset_dir`` for ``mf-longseq train``, read through MindFormers' dataset builder.

The samples, their order (``shuffle``, seeded by the dataset's ``seed``) and the dp sharding are those of the
Trainer route (``run_mindformer.py``): the same ``LongSeqCausalLanguageModelDataset`` with ``dp_shard = (dp_id,
dp)`` and ``batch_size = runner_config.batch_size``.  Batch k of this dp rank's iterator is the batch of update k;
it holds whole samples of seq_length + 1 tokens (the trainer shifts and shards them).  At the end of the data
the iterator starts again (epochs repeat).  The MindRecord must hold an ``input_ids`` column (checked before the
dataset is built) of seq_length + 1 tokens per row (checked on every batch, the first when the source opens).
"""
import os
import re

import numpy as np

from mf_longseq.models.mf_inputs import check_pretraining_rows

KEY = "train_dataset.data_loader.dataset_dir"


def _first_mindrecord(path: str):
    """The file MindFormers reads first under ``path`` (the file itself, or the first *.mindrecord* in a dir)."""
    if os.path.isfile(path):
        return path
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if re.search(r"mindrecord\d*$", name))
    return found[0] if found else None


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
        tree: the run's config (plain dict) with ``train_dataset`` / ``train_dataset_task``.
        dp_id, dp: this rank's data-parallel coordinate and degree.
        batch_size: samples per dp rank per step.
        seq_length: ``model.model_config.seq_length``; every row must hold seq_length + 1 tokens.

    Raises:
        ValueError: naming ``train_dataset.data_loader.dataset_dir`` when the MindRecord has no ``input_ids``
        column or its rows are not seq_length + 1 tokens long.

    ``sample`` must be asked in increasing step order (the trainer does; resuming at step s reads past the first
    s batches).
    """

    kind = "dataset_dir"

    def __init__(self, tree: dict, *, dp_id: int, dp: int, batch_size: int, seq_length: int):
        from mindformers.dataset import build_dataset
        from mindformers.tools.register import MindFormerConfig
        from mf_longseq.train.mf_dataset import LongSeqCausalLanguageModelDataset  # noqa: F401  (registered)
        section = dict(tree["train_dataset"])
        section["batch_size"] = batch_size
        self.path = section["data_loader"]["dataset_dir"]
        check_input_ids_column(self.path)
        task = MindFormerConfig(type="LongSeqCausalLanguageModelDataset", dataset_config=MindFormerConfig(**section))
        self.dataset = build_dataset(task, default_args={"dp_shard": (dp_id, dp)})
        self.dp, self.batch_size, self.seq_length = dp, batch_size, seq_length
        self.batches = self.dataset.get_dataset_size()
        self._iterator, self._step, self._rows = None, -1, None
        self._rows, self._step = self._next_rows(), 0            # the first batch: a wrong length stops here

    def __len__(self) -> int:
        return self.batches * self.batch_size * self.dp

    def _next_rows(self) -> np.ndarray:
        if self._iterator is None:
            self._iterator = self.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
        try:
            rows = np.asarray(next(self._iterator)[0])
        except StopIteration:
            self._iterator = None
            return self._next_rows()
        check_pretraining_rows(rows.shape, self.seq_length, where=f"{KEY} {self.path}: input_ids")
        return rows

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
