"""msrun worker: a MindFormers-format LLaMA2 checkpoint trains on through both routes (issue 22).

Usage: python mf_checkpoint_worker.py OUT_DIR DATA_DIR CKPT
Under msrun (2 CPU ranks, CP = 2 ring) rank r writes OUT_DIR/<case>/rank<r>.json with the loss of 3 steps:
``trainer_route`` (MindFormerConfig -> build_context -> Trainer.train() with ``load_checkpoint: CKPT``),
``train_loop`` (``mf-longseq train``'s ``run_job`` with ``--load-checkpoint CKPT``) and ``no_checkpoint`` (the
Trainer route from random weights).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: mf_route

from mf_route import RouteCase, dump, route_config, train_route  # noqa: E402

CASE = RouteCase("llama2_cp2_ring", "llama2_tiny_s256_cp2_colossalai_cp.yaml", cp=2, data="tokens3")


def rank() -> int:
    from mindspore.communication import GlobalComm, get_rank
    return get_rank() if GlobalComm.INITED else 0


def main() -> None:
    import mindspore as ms
    ms.set_device("CPU")
    out_dir, data_dir, ckpt = sys.argv[1:4]
    data = os.path.join(data_dir, f"{CASE.data}.mindrecord")
    for name in ("trainer_route", "train_loop", "no_checkpoint"):
        target = os.path.join(out_dir, name)
        os.makedirs(target, exist_ok=True)
        cfg = route_config(CASE, data, os.path.join(target, "run"))
        if name == "trainer_route":
            cfg.load_checkpoint = ckpt
        if name == "train_loop":
            from mf_longseq.train.job import JobOptions, load_tree, run_job
            records = run_job(JobOptions(config=load_tree(cfg), steps=3, output_dir=os.path.join(target, "run"),
                                         load_checkpoint=ckpt), stream=sys.stderr)
            losses = [r.loss for r in records]
        else:
            losses = train_route(cfg)
        dump(os.path.join(target, f"rank{rank()}.json"), losses)
        print(f"rank {rank()}: {name} done", flush=True)


if __name__ == "__main__":
    main()
