"""msrun worker (2 ranks, CP = 2): a resume whose replicas hold files of two different saves is refused.

Usage (under msrun, 2 workers): python ckpt_worker.py OUT_DIR
Runs A (seed 3) and B (seed 4) each train 2 steps and save step 2.  Rank 0 then puts B's rank_1.ckpt into A's
step_000002 (the torn checkpoint of issue 20: rank files of two saves under one meta.json).  Resuming A must be
refused on both ranks, naming the step directory; resuming B (untouched) must train step 3.  Each rank writes
OUT_DIR/rank<r>.json: {"torn": error message or null, "clean_steps": [...]}.
"""
import json
import os
import shutil

from worker_main import join_launch

from train_worker import case_tree

WORLD = 2


def main():
    from mf_longseq.train.checkpoint import rank_file, step_dir
    from mf_longseq.train.job import JobOptions, run_job
    from mf_longseq.train.runner import barrier
    rank, out_dir, _ = join_launch(WORLD)
    runs = {}
    for name, seed in (("a", 3), ("b", 4)):
        runs[name] = os.path.join(out_dir, name)
        run_job(JobOptions(config={**case_tree("llama2", cp=2), "seed": seed}, steps=2, save_every=2,
                           output_dir=runs[name]))
    if rank == 0:
        torn = rank_file(step_dir(runs["a"], 2), 1)
        os.chmod(torn, 0o644)
        shutil.copyfile(rank_file(step_dir(runs["b"], 2), 1), torn)
    barrier(WORLD)()
    result = {"torn": None, "clean_steps": []}
    try:
        run_job(JobOptions(config=case_tree("llama2", cp=2), steps=3, resume=runs["a"],
                           output_dir=os.path.join(out_dir, "a_resumed")))
    except ValueError as err:
        result["torn"] = str(err)
    records = run_job(JobOptions(config=case_tree("llama2", cp=2), steps=3, resume=runs["b"],
                                 output_dir=os.path.join(out_dir, "b_resumed")))
    result["clean_steps"] = [r.step for r in records]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
