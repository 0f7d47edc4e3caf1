"""MindFormers' Trainer route (MindFormerConfig -> build_context -> Trainer.train()) on the plugin's tiny models.

Usage: python mf_trainer_worker.py OUT_DIR DATA_DIR CASE[,CASE...]      (under msrun, or alone for 1-rank cases)
Every case of ``CASES`` named runs 3 training steps of its template on DATA_DIR/<case.data>.mindrecord; rank r
writes OUT_DIR/<case>/rank<r>.json with the loss of every step as the wrapper returned it (what MFLossMonitor
prints).  ``mf_longseq_train:<case>`` runs the same config through ``mf-longseq train`` (``run_job``) instead;
``documents_alone:<case>`` writes the loss of the first packed sample computed one document at a time.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: mf_route

from mf_route import EOD, SEQ, RouteCase, dump, packed_columns, route_config, train_route  # noqa: E402

CASES = [
    RouteCase("llama2_cp1", "llama2_tiny_s256_cp1_colossalai_cp.yaml", data="tokens3"),
    RouteCase("llama2_cp1_b2", "llama2_tiny_s256_cp1_colossalai_cp.yaml", batch_size=2, data="tokens6"),
    RouteCase("qwen1_5_cp1", "qwen1_5_tiny_s256_cp1_colossalai_cp.yaml", data="tokens3"),
    RouteCase("qwen_cp1_packed", "qwen_tiny_s256_cp2_colossalai_cp.yaml", packed=True, data="packed3"),
    RouteCase("llama2_cp2_ring", "llama2_tiny_s256_cp2_colossalai_cp.yaml", cp=2, data="tokens3"),
    RouteCase("qwen1_5_cp2_ulysses", "qwen1_5_tiny_s256_cp2_ulysses_cp.yaml", cp=2, algo="ulysses_cp",
              data="tokens3"),
    RouteCase("qwen_cp2_packed", "qwen_tiny_s256_cp2_colossalai_cp.yaml", cp=2, packed=True, data="packed3"),
    RouteCase("llama2_dp2_cp2", "llama2_tiny_s256_cp2_colossalai_cp.yaml", dp=2, cp=2, data="tokens6"),
    RouteCase("llama2_cp2_mp2", "llama2_tiny_s256_cp2_colossalai_cp.yaml", cp=2, mp=2, data="tokens3"),
]
BY_NAME = {c.name: c for c in CASES}


def rank() -> int:
    from mindspore.communication import GlobalComm, get_rank
    return get_rank() if GlobalComm.INITED else 0


def documents_alone(case: RouteCase, data_dir: str) -> float:
    """Mean loss of the first packed sample, every document through a CP = 1 model of its own length."""
    from mindformers import MindFormerConfig  # noqa: F401  (registers the config machinery)
    from mf_longseq.models import build_model
    from mf_longseq.parallel import Mesh
    from mf_longseq.train.job import load_tree
    import mindspore as ms
    tokens = np.load(os.path.join(data_dir, f"{case.data}.npy"))[:1]
    cols = packed_columns(tokens, 8)
    tree = load_tree(route_config(case, "unused", "unused"))
    tree["parallel_config"]["context_parallel"] = 1
    tree["long_seq"]["device_num"] = 1
    starts = [0] + [int(e) for e in cols["actual_seq_len"][0] if 0 < e < SEQ] + [SEQ]
    total = count = 0.0
    for a, b in zip(starts[:-1], starts[1:]):
        tree["model"]["model_config"]["seq_length"] = b - a
        model = build_model(tree, mesh=Mesh(rank=0))
        piece = [ms.Tensor(cols[k][:, a:b]) for k in ("input_ids", "labels", "loss_mask")]
        loss_sum, n = model(*piece)
        total, count = total + float(loss_sum.asnumpy()), count + float(n.asnumpy())
    return total / count


def mf_longseq_train(case: RouteCase, data_dir: str, out_dir: str) -> list:
    """The same config through ``mf-longseq train`` (run_job): the loss of every step."""
    from mf_longseq.train.job import JobOptions, load_tree, run_job
    tree = load_tree(route_config(case, os.path.join(data_dir, f"{case.data}.mindrecord"), out_dir))
    records = run_job(JobOptions(config=tree, steps=3, output_dir=out_dir), stream=sys.stderr)
    return [r.loss for r in records]


def run(spec: str, out_dir: str, data_dir: str) -> None:
    kind, _, name = spec.rpartition(":")
    case = BY_NAME[name]
    target = os.path.join(out_dir, spec.replace(":", "__"))
    os.makedirs(target, exist_ok=True)
    if kind == "documents_alone":
        value = documents_alone(case, data_dir)
    elif kind == "mf_longseq_train":
        value = mf_longseq_train(case, data_dir, os.path.join(target, "run"))
    else:
        cfg = route_config(case, os.path.join(data_dir, f"{case.data}.mindrecord"), os.path.join(target, "run"))
        value = train_route(cfg)
    dump(os.path.join(target, f"rank{rank()}.json"), value)


def main() -> None:
    import mindspore as ms
    ms.set_device("CPU")
    out_dir, data_dir, specs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    for spec in specs:
        run(spec, out_dir, data_dir)
        print(f"rank {rank()}: {spec} done", flush=True)


if __name__ == "__main__":
    main()
