"""``train_dataset.data_loader.dataset_dir`` for ``mf-longseq train``, read through MindFormers' dataset builder.

The samples, their order (``shuffle``, seeded by the dataset's ``seed``) and the dp sharding are those of the
Trainer route (``run_mindformer.py``): the same ``LongSeqCausalLanguageModelDataset`` with ``dp_shard = (dp_id,
dp)`` and ``batch_size = runner_config.batch_size``.  Batch k of this dp rank's iterator is the batch of update k;
it holds whole samples of seq_length + 1 tokens (the trainer shifts and shards them).  At the end of the data
the iterator starts again (epochs repeat).
"""
import os

import numpy as np


class DatasetDirTokens:
    """Token source over MindFormers' dataset of one dp rank (``sample(index)`` in ``batch_for_step`` order).

    Args:
        tree: the run's config (plain dict) with ``train_dataset`` / ``train_dataset_task``.
        dp_id, dp: this rank's data-parallel coordinate and degree.
        batch_size: samples per dp rank per step.

    ``sample`` must be asked in increasing step order (the trainer does; resuming at step s reads past the first
    s batches).
    """

    kind = "dataset_dir"

    def __init__(self, tree: dict, *, dp_id: int, dp: int, batch_size: int):
        from mindformers.dataset import build_dataset
        from mindformers.tools.register import MindFormerConfig
        from mf_longseq.train.mf_dataset import LongSeqCausalLanguageModelDataset  # noqa: F401  (registered)
        section = dict(tree["train_dataset"])
        section["batch_size"] = batch_size
        self.path = section["data_loader"]["dataset_dir"]
        task = MindFormerConfig(type="LongSeqCausalLanguageModelDataset", dataset_config=MindFormerConfig(**section))
        self.dataset = build_dataset(task, default_args={"dp_shard": (dp_id, dp)})
        self.dp, self.batch_size = dp, batch_size
        self.batches = self.dataset.get_dataset_size()
        self._iterator, self._step, self._rows = None, -1, None

    def __len__(self) -> int:
        return self.batches * self.batch_size * self.dp

    def _next_rows(self) -> np.ndarray:
        if self._iterator is None:
            self._iterator = self.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
        try:
            return np.asarray(next(self._iterator)[0])
        except StopIteration:
            self._iterator = None
            return self._next_rows()

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


__all__ = ["DatasetDirTokens"]
