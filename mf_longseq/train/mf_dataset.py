"""``LongSeqCausalLanguageModelDataset``: MindFormers' causal-LM dataset, sharded over data parallelism only.

MindFormers' ``CausalLanguageModelDataset`` gives every rank its own shard of the samples (shard = global
rank, shards = world size) outside semi-auto parallel.  Under context (and model) parallelism the ranks of one
dp group must read the *same* samples and each keeps its cut of the sequence.  This class is that dataset with
``shard_id = dp_id`` and ``num_shards = dp``, given explicitly as ``dp_shard = (dp_id, dp)`` by ``LongSeqTrainer``
(``mf_route/trainer.py``); everything else (MindRecord reading, ``dataset_dir``, batching, columns) is
MindFormers' own.  With ``dp_shard`` absent it is MindFormers' dataset unchanged (one rank, or plain dp).

``scan_dataset`` (called on the built dataset by ``LongSeqTrainer`` and by ``mf-longseq train``'s ``dataset_dir``
route, with ``data_check_of``) checks the rows this rank will read before the first step: shapes, ids and
labels in [0, vocab_size), loss_mask finite and >= 0, no all-padding sample, at least one batch.  Its cost is one
extra read of this rank's shard (one epoch, or the batches the run reads if fewer) through the same pipeline, no
device work.
"""
from typing import Optional, Tuple

from mindformers.dataset.causal_language_model_dataset import CausalLanguageModelDataset

from mf_longseq.train.columns import check_pretraining_rows, padding_rows, whole_batch


def _check_shard(dp_shard) -> Tuple[int, int]:
    shard_id, num_shards = (int(v) for v in dp_shard)
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"dp_shard = {tuple(dp_shard)!r}: need (dp_id, dp) with 0 <= dp_id < dp. "
                         "Fix: let LongSeqTrainer build the dataset (trainer.type: LongSeqTrainer).")
    return shard_id, num_shards


class LongSeqCausalLanguageModelDataset(CausalLanguageModelDataset):
    """``train_dataset_task.type: LongSeqCausalLanguageModelDataset`` (same ``dataset_config`` keys as MindFormers').

    Args:
        dataset_config: MindFormers' ``train_dataset`` section.
        dp_shard: (dp_id, dp) of this rank; None: MindFormers' own sharding (every rank its own samples).
        **kwargs: MindFormers' ``CausalLanguageModelDataset`` arguments.

    Returns:
        The MindSpore dataset, each sample read by exactly the ranks of one dp group.
    """

    def __new__(cls, dataset_config: Optional[dict] = None, dp_shard: Optional[Tuple[int, int]] = None, **kwargs):
        if dp_shard is None:
            return CausalLanguageModelDataset.__new__(CausalLanguageModelDataset, dataset_config, **kwargs)
        shard = _check_shard(dp_shard)
        sharded = type("DataParallelShardedDataset", (CausalLanguageModelDataset,),
                       {"_generate_shard_info": classmethod(lambda _cls: shard)})
        return CausalLanguageModelDataset.__new__(sharded, dataset_config, **kwargs)


def data_check_of(settings, *, batch_size: int, dp: int, max_batches: Optional[int] = None) -> dict:
    """The ``data_check`` arguments of a run's ``RunSettings``: the model's vocab_size / seq_length, the YAML's
    pad_token_id, ``train_dataset.data_loader.dataset_dir`` (named in errors), the batch of this rank."""
    model, directory = settings.model, settings.data.dataset_dir
    return {"vocab_size": model.vocab_size, "seq_length": model.seq_length,
            "pad_token_id": settings.data.pad_token_id, "max_batches": max_batches,
            "where": f"train_dataset.data_loader.dataset_dir {directory}",
            "batch_rows": f"runner_config.batch_size x data_parallel = {batch_size} x {dp} = {batch_size * dp}"}


def scan_dataset(dataset, *, vocab_size: Optional[int], seq_length: int, pad_token_id: Optional[int], where: str,
                 max_batches: Optional[int] = None, batch_rows: str = "one batch") -> int:
    """Check the first ``max_batches`` batches (None: one epoch) of ``dataset`` before any step; returns the
    batches checked.  Each batch goes through ``columns.whole_batch`` (shapes, id range, loss_mask) and must
    hold no all-padding sample (no label that counts: it would end the run when drawn alone).

    Raises:
        ValueError: naming ``where``, the batch (= update number - 1 of the first epoch), the row and the fix;
            or the dataset gives no batch at all.
    """
    batches = dataset.get_dataset_size()
    if batches < 1:
        raise ValueError(f"{where}: the data make no batch of {batch_rows} rows (MindFormers drops an incomplete "
                         "batch; an empty MindRecord makes none). Fix: write more rows, or lower "
                         "runner_config.batch_size.")
    limit = batches if max_batches is None else min(batches, max_batches)
    iterator = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    try:
        for index, columns in zip(range(limit), iterator):
            if len(columns) == 1:                                 # pretraining: (B, seq_length + 1)
                check_pretraining_rows(columns[0].shape, seq_length, where=f"{where}: input_ids")
            prefix = f"{where}: batch {index} (update {index + 1} of an epoch), "
            _, _, mask = whole_batch(seq_length, pad_token_id, *columns[:3], vocab_size=vocab_size, where=prefix)
            empty = padding_rows(mask)
            if empty.size:
                raise ValueError(f"{prefix}row {int(empty[0])}: no label counts (every label is "
                                 f"model.model_config.pad_token_id = {pad_token_id}, -100 or masked): an all-padding "
                                 "sample. Fix: drop all-padding rows from the data (or check pad_token_id).")
    finally:
        iterator.stop()
    return limit


__all__ = ["LongSeqCausalLanguageModelDataset", "data_check_of", "scan_dataset"]
