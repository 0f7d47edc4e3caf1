"""The step's arithmetic, one home for both routes: ``mf-longseq train`` (``train/data.py``, ``train/runner.py``)
and MindFormers' Trainer (``mf_route/inputs.py``, ``mf_route/wrapper.py``).

Shapes: B samples, S = ``seq_length`` tokens, P = number of gradient elements (sum of the parameters' sizes).

* Label shift: a sample holds S + 1 tokens; ``ids = tokens[:, :-1]``, ``labels = tokens[:, 1:]``, and the loss
  mask is 0 where the label is ``pad_token_id`` (a padded position is never a target; MindFormers' own
  LlamaForCausalLM masks where the *input* is the pad: both agree on unpadded data).
* Global token count: the sum of the loss mask over dp x cp, in float32 (CPU AllReduce has no integer kernel;
  counts stay exact up to 2^24 tokens per step, beyond that the mean is off by < 1e-7 relative).  Each rank
  differentiates ``loss_sum / count``: its share of the global-mean objective.
* Gradient sum and clipping: the shares summed over dp x cp in one flat float32 collective (the sum is the
  gradient of the global mean), then MindFormers' ``ClipGradNorm`` formula with the whole model's norm
  (``train/clip.py``) when ``runner_wrapper.use_clip_grad``.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from mf_longseq.parallel.comm import all_reduce
from mf_longseq.train.clip import clip_coefficient, global_grad_norm


def loss_mask_from_labels(labels: np.ndarray, pad_token_id: Optional[int]) -> np.ndarray:
    """(B, S) float32: 1 where the label counts, 0 where it is ``pad_token_id`` (None: every label counts)."""
    mask = np.ones(np.shape(labels), np.float32)
    if pad_token_id is not None:
        mask[np.asarray(labels) == pad_token_id] = 0.0
    return mask


def shift_labels(tokens: np.ndarray, pad_token_id: Optional[int]):
    """(B, S + 1) tokens -> (ids (B, S), labels (B, S), loss_mask (B, S) float32); ids and labels keep the
    tokens' dtype."""
    labels = tokens[:, 1:]
    return tokens[:, :-1], labels, loss_mask_from_labels(labels, pad_token_id)


def global_token_count(local_mask_sum: float, group, where: str = "") -> float:
    """Sum over ``group`` (dp x cp) of each rank's loss-mask sum (a host float, summed in float32).

    Raises:
        ValueError: every label of the batch is masked (``where`` prefixes the message).
    """
    count = float(all_reduce(Tensor(np.array([local_mask_sum], np.float32)), group).asnumpy()[0])
    if count <= 0:
        raise ValueError(f"{where}every label of the batch is masked (loss_mask, or labels equal to "
                         "model.model_config.pad_token_id). Fix: check the data and pad_token_id.")
    return count


def sum_gradients(flat, group):
    """The flat float32 gradient (P,) summed over ``group`` (dp x cp): one collective."""
    return all_reduce(flat, group)


def clip_flat(flat, sizes: Sequence[int], names: Sequence[str], mesh, max_grad_norm: float,
              sharded=None) -> Tuple[object, float]:
    """(flat (P,) times MindFormers' ClipGradNorm factor, the whole model's gradient norm); ``sizes`` and
    ``names`` are the parameters' in flat order, ``sharded`` their mp split (``shard_specs``)."""
    pieces, start = [], 0
    for n in sizes:
        pieces.append(flat[start:start + n])
        start += n
    norm = global_grad_norm(pieces, names, mesh, sharded)
    return flat * float(clip_coefficient(norm, max_grad_norm)), norm


def sync_flat_gradients(flat, group, *, sizes: Sequence[int], names: Sequence[str], mesh,
                        max_grad_norm: Optional[float], sharded=None):
    """(gradient (P,) summed over dp x cp and clipped when ``max_grad_norm`` is set, the norm or None)."""
    flat = sum_gradients(flat, group)
    if max_grad_norm is None:
        return flat, None
    return clip_flat(flat, sizes, names, mesh, max_grad_norm, sharded)


__all__ = ["loss_mask_from_labels", "shift_labels", "global_token_count", "sum_gradients", "clip_flat",
           "sync_flat_gradients"]
