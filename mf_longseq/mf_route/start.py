"""``load_checkpoint:`` on MindFormers' Trainer route: the plugin loads the start weights itself.

MindFormers' own loading (``preload_ckpt`` then ``load_checkpoint`` / ``transform_and_load_checkpoint``) does not
fit the plugin's models: it matches names one to one, so a checkpoint in MindFormers' own LLaMA2 / Qwen / Qwen1.5
naming loads nothing but ``lm_head.weight`` (MindSpore only warns), and under msrun on CPU ``preload_ckpt`` dies on
a Barrier the CPU backend has no kernel for.  ``LongSeqTrainer`` therefore takes the path out of the config before
MindFormers sees it (``take_start_checkpoint``) and fills the built network from it
(``models.start_weights.load_start_weights``: either naming, every weight required, this rank's mp shard).

``resume_training: True`` (MindFormers' resume: weights, optimizer and step from its own checkpoints) stays
MindFormers' business; on CPU with more than one rank it is refused before any device work (the same Barrier).
"""
import os
from typing import Optional

from mf_longseq.config import ConfigError


def take_start_checkpoint(config, *, world_size: int) -> Optional[str]:
    """The absolute start-weights path of a MindFormers config (``checkpoint.load_path``, which MindFormers'
    ``Trainer`` fills from ``load_checkpoint``), removed from the config so MindFormers loads nothing itself.
    None: no start weights, or a resume MindFormers runs.

    Raises:
        ConfigError: the path does not exist; ``resume_training`` under msrun on CPU.
    """
    section = config.get("checkpoint") or {}
    path = section.get("load_path") or config.get("load_checkpoint") or None
    if not path:
        return None
    device = (config.get("context") or {}).get("device_target", "Ascend")
    if config.get("resume_training"):
        if device == "CPU" and world_size > 1:
            raise ConfigError("resume_training", config.get("resume_training"), "MindFormers' resume loads through "
                              "preload_ckpt, which needs a Barrier kernel the CPU backend does not have",
                              "start from the weights instead (resume_training: False keeps load_checkpoint as start "
                              "weights), or resume with `mf-longseq train --resume RUN_DIR`")
        return None
    if not isinstance(path, str) or not os.path.exists(path):
        raise ConfigError("load_checkpoint", path, "no such file or folder", "give the path of a .ckpt / "
                          ".safetensors file (ours or MindFormers' LLaMA2 / Qwen / Qwen1.5 names)")
    config.load_checkpoint = ""
    if section:
        section.load_path = None
    return os.path.abspath(path)


__all__ = ["take_start_checkpoint"]
