"""``LongSeqCausalLanguageModelDataset``: MindFormers' causal-LM dataset, sharded over data parallelism only.

MindFormers' ``CausalLanguageModelDataset`` gives every rank its own shard of the samples (shard = global
rank, shards = world size) outside semi-auto parallel.  Under context (and model) parallelism the ranks of one
dp group must read the *same* samples and each keeps its cut of the sequence.  This class is that dataset with
``shard_id = dp_id`` and ``num_shards = dp``, given explicitly as ``dp_shard = (dp_id, dp)`` by ``LongSeqTrainer``
(``train/mf_trainer.py``); everything else (MindRecord reading, ``dataset_dir``, batching, columns) is
MindFormers' own.  With ``dp_shard`` absent it is MindFormers' dataset unchanged (one rank, or plain dp).
"""
from typing import Optional, Tuple

from mindformers.dataset.causal_language_model_dataset import CausalLanguageModelDataset


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


__all__ = ["LongSeqCausalLanguageModelDataset"]
