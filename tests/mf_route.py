"""MindFormers' Trainer route in tests: small MindRecords, template configs, a loss recorder, one training run.

    write_tokens(path, tokens)                          pretraining MindRecord, column input_ids (S + 1 tokens)
    write_packed(path, tokens, eod, eod_pad_length)     the 5 packed columns (input_ids, labels, loss_mask,
                                                        position_ids, actual_seq_len), EOD positions masked
    losses = train_route(route_config(RouteCase(...), data_path))   MindFormerConfig -> build_context -> Trainer

The configs are the shipped tiny templates, changed only where a test must: dataset_dir, shuffle off (so dp
shards and the one-rank batch hold the same samples), a short sequence and the degrees of the case.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yaml_templates" / "tiny"
SEQ = 64
VOCAB = 256
EOD = 2
PACKED_COLUMNS = ["input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len"]


@dataclass(frozen=True)
class RouteCase:
    name: str
    template: str                      # file name in yaml_templates/tiny
    dp: int = 1
    cp: int = 1
    mp: int = 1
    algo: str = "colossalai_cp"
    batch_size: int = 1
    packed: bool = False
    data: str = "tokens"               # which data file (tests/dist/test_mf_trainer_route.py)
    overrides: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.mp


def write_tokens(path, tokens: np.ndarray) -> str:
    from mindspore.mindrecord import FileWriter
    writer = FileWriter(str(path), 1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "tokens")
    writer.write_raw_data([{"input_ids": row.astype(np.int32)} for row in tokens])
    writer.commit()
    return str(path)


def packed_columns(tokens: np.ndarray, eod_pad_length: int) -> dict:
    """The 5 columns of (N, S + 1) token rows with EOD documents; the loss of an EOD input position is masked
    (its label starts the next document, which no document alone predicts)."""
    from packed_docs import pack_documents
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    packed = pack_documents(ids, EOD, eod_pad_length, use_eod_reset=True)
    mask = (ids != EOD).astype(np.float32)
    return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32), "loss_mask": mask,
            "position_ids": packed["position_ids"].astype(np.int32),
            "actual_seq_len": packed["actual_seq_len"].astype(np.int32)}


def write_packed(path, tokens: np.ndarray, eod_pad_length: int = 8) -> str:
    from mindspore.mindrecord import FileWriter
    cols = packed_columns(tokens, eod_pad_length)
    writer = FileWriter(str(path), 1, overwrite=True)
    writer.add_schema({name: {"type": "float32" if name == "loss_mask" else "int32", "shape": [-1]}
                       for name in PACKED_COLUMNS}, "packed")
    writer.write_raw_data([{name: cols[name][i] for name in PACKED_COLUMNS} for i in range(len(tokens))])
    writer.commit()
    return str(path)


def route_config(case: RouteCase, data_path: str, output_dir: str):
    """The case's template as a MindFormerConfig, pointed at ``data_path``."""
    from mindformers import MindFormerConfig
    cfg = MindFormerConfig(str(TINY / case.template))
    cfg.use_parallel = case.world > 1
    cfg.output_dir = output_dir
    loader = cfg.train_dataset.data_loader
    loader.dataset_dir, loader.shuffle = data_path, False
    cfg.train_dataset.batch_size = cfg.runner_config.batch_size = case.batch_size
    if case.packed:
        cfg.train_dataset.input_columns = list(PACKED_COLUMNS)
        cfg.model.model_config.use_eod_reset = True
    cfg.model.model_config.seq_length = SEQ
    cfg.long_seq.block_size, cfg.long_seq.device_num = 16, case.world
    pc = cfg.parallel_config
    pc.data_parallel, pc.context_parallel, pc.context_parallel_algo = case.dp, case.cp, case.algo
    pc.model_parallel = case.mp
    for dotted, value in case.overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


def loss_recorder():
    """A MindSpore Callback collecting the loss MindFormers' wrapper returns at every step (``.losses``); ``.last``:
    the last step's callback parameters (``train_network``: the wrapper, ``net_outputs``: what it returned)."""
    from mindspore.train import Callback
    from mindformers.core.callback.callback import _get_loss_output

    class Recorder(Callback):
        def __init__(self):
            super().__init__()
            self.losses, self.last = [], None

        def on_train_step_end(self, run_context):
            self.last = run_context.original_args()
            self.losses.append(float(_get_loss_output(run_context.original_args().net_outputs)[0]))

    return Recorder()


def train_route(cfg) -> list:
    """``build_context(cfg)`` then ``Trainer(cfg).train()``; the loss of every step."""
    from mindformers import Trainer, build_context
    os.environ.setdefault("REGISTER_PATH", str(ROOT / "mf_longseq"))
    build_context(cfg)
    recorder = loss_recorder()
    Trainer(cfg, callbacks=[recorder]).train()
    return recorder.losses


def dump(path, value) -> None:
    Path(path).write_text(json.dumps(value), encoding="utf-8")
