"""The part of the decoder one pipeline stage runs (``DecoderStage``).

Stage s of P holds the contiguous range of decoder layers ``parallel.plan.stage_layers(num_layers, P, s)``; the
embedding lives on the first stage, the final norm, LM head and loss on the last.  The schedule that runs the
stages and the transfers between them are ``parallel/pipeline.py``'s; the step around it is the trainer's
(``train/executor.py`` ``PipelinedStep``).

Shapes: B micro-batch, S tokens of this rank (S_global / CP), H hidden.
"""
from mindspore import nn

from mf_longseq.parallel.plan import stage_layers


class DecoderStage(nn.Cell):
    """The part of a ``LongSeqForCausalLM`` one pipeline stage runs (embedding first, norm + head + loss last).

    The model's own sub-cells are reused (no copy; parameter names unchanged): ``model.model.embed_tokens``,
    ``model.model.layers[stage_layers(..)]``, ``model.model.norm`` and ``model.head_loss``.

    Inputs of ``construct``: first stage ``(batch,)``; other stages ``(hidden, batch)``; plus, on the last stage,
    ``inv_count``.  ``batch`` is the micro-batch's ``ShardedBatch`` (``batch.py``): ids on the first stage, RoPE
    tables and the attention plan (document ids of packed samples) on every stage, labels and loss mask on the
    last.  Outputs: the hidden state (B, S/CP/SP, H) for the next stage (SP = model_parallel under sequence
    parallelism, else 1), or on the last stage
    ``(loss_sum * inv_count, loss_sum)`` (the objective and, for logging, the unscaled sum).

    Raises:
        ValueError: tied embeddings (``tie_word_embeddings``) with more than one stage.
    """

    def __init__(self, model, stage: int, num_stages: int):
        super().__init__(auto_prefix=False)
        if num_stages > 1 and getattr(model, "lm_head", None) is None:
            raise ValueError("model.model_config.tie_word_embeddings = True with parallel_config.pipeline_stage = "
                             f"{num_stages}: the embedding (first stage) and the LM head (last stage) would share "
                             "one weight. Fix: set tie_word_embeddings: False or pipeline_stage: 1")
        self.model = [model]                           # not a child: its parameters keep their names
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_ids = stage_layers(len(model.model.layers), num_stages, stage)
        self.embed = model.model.embed_tokens if self.first else None
        self.layers = nn.CellList([model.model.layers[i] for i in self.layer_ids], auto_prefix=False)
        self.norm = model.model.norm if self.last else None
        self.head = model.lm_head if self.last else None

    def construct(self, *inputs):
        model = self.model[0]
        if self.first:
            batch, extra = inputs[0], inputs[1:]
            hidden = model.embed(batch)                                    # (B, S/CP) ids -> (B, S/CP, H)
        else:
            hidden, batch, extra = inputs[0], inputs[1], inputs[2:]
        for layer in self.layers:
            hidden = model.model.run_layer(layer, hidden, batch)
        if not self.last:
            return hidden
        inv_count, = extra
        loss_sum, _ = model.head_loss(model.model.final_norm(hidden), batch.labels, batch.loss_mask)
        return loss_sum * inv_count, loss_sum


__all__ = ["DecoderStage"]
