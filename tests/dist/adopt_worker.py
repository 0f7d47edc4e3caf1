"""MindFormers' Trainer route on YAMLs written by ``mf-longseq adopt`` from MindFormers' own shipped files.

Usage: python adopt_worker.py OUT_DIR DATA CASE[,CASE...]      (under msrun for CP = 2, alone for CP = 1)
A case is ``<shipped yaml stem>:<cp>:<algo>[:pretraining_columns]``: the file is adopted (``--route mindformers --cp --algo --dp 1 --mp 1``),
shrunk to a tiny CPU model (the test's only change: sizes, device, data), written to OUT_DIR and trained 3 steps
through ``MindFormerConfig`` -> ``build_context`` -> ``Trainer.train()`` (what run_mindformer.py runs).  Rank r
writes OUT_DIR/<case>/rank<r>.json: the losses, and the last step's learning rate and global norm as the runner
wrapper returned them to MFLossMonitor.
"""
import os
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))                                     # tests/: mf_route

from mf_route import SEQ, VOCAB, dump, loss_recorder  # noqa: E402

SHIPPED = HERE.parent / "data" / "mindformers_yamls"
TINY_MODEL = {"seq_length": SEQ, "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
              "n_kv_heads": 2, "intermediate_size": 128, "compute_dtype": "float32", "param_init_type": "float32",
              "use_flash_attention": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def shrink(tree: dict, data: str, out: str) -> dict:
    """The adopted tree at tiny CPU sizes: the model's size keys, the device, the data and the output only."""
    tree["model"]["model_config"].update(TINY_MODEL)
    tree["context"] = {"mode": tree["context"]["mode"], "device_target": "CPU", "runtime_num_threads": 1}
    tree["output_dir"], tree["use_parallel"] = out, tree["parallel_config"]["context_parallel"] > 1
    dataset = tree["train_dataset"]
    dataset["data_loader"].update(dataset_dir=data, shuffle=False)
    dataset.update(batch_size=1, num_parallel_workers=1)
    tree["runner_config"].update(batch_size=1, epochs=1)
    tree["long_seq"] = {"block_size": 16, "device_num": tree["parallel_config"]["context_parallel"]}
    return tree


def run_case(case: str, out_dir: str, data: str) -> dict:
    from mindformers import MindFormerConfig, Trainer, build_context
    from mf_longseq.tools.adopt import adopt
    stem, cp, algo, *flags = case.split(":")
    adopted = adopt(str(SHIPPED / f"{stem}.yaml"), route="mindformers", cp=int(cp), algo=algo, dp=1, mp=1,
                    pretraining_columns="pretraining_columns" in flags)
    assert not adopted.refusals, [str(e) for e in adopted.refusals]
    target = Path(out_dir) / case.replace(":", "_")
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"adopted_rank{os.environ.get('RANK_ID', '0')}.yaml"       # each rank writes its own copy
    path.write_text(yaml.safe_dump(shrink(adopted.tree, data, str(target / "run")), sort_keys=False))
    cfg = MindFormerConfig(str(path))
    build_context(cfg)
    recorder = loss_recorder()
    Trainer(cfg, callbacks=[recorder]).train()
    outputs = recorder.last.net_outputs
    return {"losses": recorder.losses, "lr": float(np.asarray(outputs[3].asnumpy()).reshape(-1)[0]),
            "global_norm": None if outputs[4] is None else float(np.asarray(outputs[4].asnumpy()).reshape(-1)[0])}


def main() -> None:
    import mindspore as ms
    from mindspore.communication import GlobalComm, get_rank
    ms.set_device("CPU")
    os.environ.setdefault("REGISTER_PATH", str(HERE.parents[1] / "mf_longseq"))
    out_dir, data, cases = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    for case in cases:
        result = run_case(case, out_dir, data)
        rank = get_rank() if GlobalComm.INITED else 0
        dump(Path(out_dir) / case.replace(":", "_") / f"rank{rank}.json", result)
        print(f"rank {rank}: {case} done", flush=True)


if __name__ == "__main__":
    main()
