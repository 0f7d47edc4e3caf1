"""Layer-input offload (``long_seq.offload_layer_inputs``): with recompute, each decoder layer's saved input lives
in host memory between the layer's forward and its backward.

With ``recompute_config.recompute: True`` a layer keeps only its input for the backward (the rest is recomputed).
Offload moves that input to the host: the layer runs under MindSpore's non-reentrant recompute
(``Cell.recompute(use_reentrant=False)``), whose input saver hands the saved inputs to the saved-tensor hooks of
``mindspore.saved_tensors_hooks`` (MindSpore 2.9).  ``LayerInputOffload.run`` wraps the layer's call in those
hooks: *pack* starts an asynchronous device -> host copy of the layer input (``Tensor.move_to("CPU",
blocking=False)``) when the layer's forward begins, so the copy runs beside the layer's compute, and keeps only
the host copy; *unpack*, when the backward reaches the layer, takes the device copy that the previous unpack
started (one layer ahead: the backward of layer i starts the host -> device copy of layer i-1's input) and
starts the next one.  The device input is freed once the layer's forward has used it.

On CPU the same code path runs (host and device are the same memory, ``move_to("CPU")`` copies): results are
unchanged, memory is not observable there.  On Ascend the copies are ``move_to`` with ``blocking=False``.

Memory (per rank; L_s = layers of this pipeline stage, B micro-batch, S = S_global / CP / SP tokens, SP =
model_parallel under sequence parallelism else 1, H hidden, e = bytes of compute_dtype; layer input
I = B * S * H * e):
    device, kept layer inputs:  L_s * I  ->  2 * I  (the layer in backward and the one prefetched)
    host:                        L_s * I  pinned by this rank (per node: ranks per node x L_s * I)
Saved per layer: I bytes of device memory, for all but two layers.  Measured on the Ascend dry-run tier
(``tests/ascend_sim/cases_planner.py``, MindSpore's pool peak): after each layer's forward the pool holds no more
of its input, and with 8 layers, hidden 256, S = 32768 the step's peak drops by 82.5 MiB of the 96 MiB = 6 I the
planner puts on the host (the peak moves from the top layer's backward to the bottom one's, where every weight
gradient exists).  Where a layer's weight gradients outweigh its input (I < layer parameters x gradient bytes)
the peak is the bottom layer's backward with or without offload, when the other inputs are already released,
and offload saves nothing (``cases_sp_offload.py``'s shape: I = 4 MiB, 18 MiB of gradients a layer).
Pipeline schedules keeping several micro-batches in flight multiply both sides by the micro-batches in flight
(1F1B: at most P - s on stage s).
"""
import weakref

import mindspore as ms

from mf_longseq.config import check_offload


class _HostCopy:
    """A packed layer input: its host copy, and the device copy once a prefetch started."""

    __slots__ = ("host", "device", "previous", "__weakref__")

    def __init__(self, host, previous):
        self.host, self.device, self.previous = host, None, previous


class LayerInputOffload:
    """Offload of each layer's saved input to host memory, prefetched one layer ahead in the backward.

    Args:
        device_target: ``context.device_target`` (the device the inputs come back to).

    Layers must be recomputed without reentry (``apply_offload`` arranges it); ``run(layer, x, *args)`` calls
    the layer.  Only ``x`` (the first tensor saved with x's shape and dtype: the recompute saver saves the layer's
    inputs in argument order) goes to the host; the other saved inputs (the step's RoPE tables, shared by every
    layer) stay where they are.
    """

    def __init__(self, device_target: str):
        self.device = device_target
        self._last = None                       # weak reference to the latest packed input (chain for prefetch)

    def _copy_back(self, packed: _HostCopy) -> None:
        if packed.device is None:
            packed.device = packed.host.move_to(self.device, blocking=False)

    def run(self, layer, x, *args):
        """``layer(x, *args)`` with x's saved copy on the host; x (B, S, H) the layer input."""
        shape, dtype, pending = tuple(x.shape), x.dtype, [True]

        def pack(tensor):
            if not (pending[0] and tuple(tensor.shape) == shape and tensor.dtype == dtype):
                return tensor
            pending[0] = False
            packed = _HostCopy(tensor.move_to("CPU", blocking=False), self._last)
            self._last = weakref.ref(packed)
            return packed

        def unpack(packed):
            if not isinstance(packed, _HostCopy):
                return packed
            self._copy_back(packed)
            previous = packed.previous() if packed.previous is not None else None
            if previous is not None:
                self._copy_back(previous)                   # one layer ahead of the backward
            device, packed.device, packed.host = packed.device, None, None
            return device

        with ms.saved_tensors_hooks(pack, unpack):
            return layer(x, *args)


def apply_offload(model, recompute: bool) -> None:
    """``long_seq.offload_layer_inputs``: recompute every decoder layer without reentry and offload its input.

    Args:
        model: a ``LongSeqForCausalLM`` (its ``long_seq.offload_layer_inputs`` decides).
        recompute: ``recompute_config.recompute``.

    Raises:
        ConfigError: offload without recompute (there is no single saved input to offload then).
    """
    if not model.long_seq.offload_layer_inputs:
        return
    check_offload(True, recompute)
    for layer in model.model.layers:
        layer.recompute(use_reentrant=False, early_stop=False)    # whole layer: its collectives all re-run
    model.model.layer_offload = LayerInputOffload(model.long_seq.device_target)


__all__ = ["LayerInputOffload", "apply_offload"]
