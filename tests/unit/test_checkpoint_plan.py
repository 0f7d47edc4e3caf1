"""meta.json records the run's RunPlan under ``run_plan`` (the sequence cut as ``seq_layout``); a checkpoint written
before that (the same fields under ``layout``, the cut under ``layout.layout``) still resumes and reshards."""
import json

from mf_longseq.parallel.plan import RunPlan
from mf_longseq.parallel.reshard import plan_record, saved_plan
from mf_longseq.train import checkpoint as ckpt
from mf_longseq.train.job import JobOptions, run_job

from test_train_runner import bigram_factory, job_tree

PLAN = RunPlan(dp=2, cp=4, mp=1, pp=2, ulysses=2, seq_layout="contiguous", algo="hybrid_cp")


def _as_old_format(meta: dict) -> dict:
    """``meta`` as mf_longseq wrote it before ``run_plan``: ``layout`` holding the plan, ``layout.layout`` the cut."""
    old = {k: v for k, v in meta.items() if k != "run_plan"}
    record = dict(meta["run_plan"])
    record["layout"] = record.pop("seq_layout")
    old["layout"] = record
    return old


def test_meta_names_the_plan_run_plan_and_the_cut_seq_layout(tmp_path):
    run_job(JobOptions(config=job_tree(), steps=2, save_every=2, output_dir=str(tmp_path)),
            model_factory=bigram_factory)
    meta = ckpt.read_meta(ckpt.step_dir(str(tmp_path), 2))
    assert "layout" not in meta and meta["run_plan"]["seq_layout"] == "zigzag" and "layout" not in meta["run_plan"]
    assert meta["run_plan"]["world_size"] == 1 and meta["run_plan"]["context_parallel_algo"] == "colossalai_cp"


def test_both_formats_give_the_same_plan():
    new = {"run_plan": plan_record(PLAN)}
    old = {"layout": PLAN.as_dict()}                        # what meta.json held before run_plan
    assert old["layout"]["layout"] == "contiguous" and new["run_plan"]["seq_layout"] == "contiguous"
    assert saved_plan(new) == saved_plan(old) == PLAN


def test_an_old_format_checkpoint_resumes_to_the_same_losses(tmp_path):
    """Save at step 2, rewrite meta.json as the old format, resume to step 4: the losses of steps 3-4 equal those
    of an uninterrupted run; a plan that needs resharding (pp 2) reads the old meta's degrees."""
    full = run_job(JobOptions(config=job_tree(), steps=4), model_factory=bigram_factory)
    run_job(JobOptions(config=job_tree(), steps=2, save_every=2, output_dir=str(tmp_path)),
            model_factory=bigram_factory)
    directory = ckpt.step_dir(str(tmp_path), 2)
    path = f"{directory}/{ckpt.META}"
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_as_old_format(meta), handle)
    old = ckpt.read_meta(directory)
    assert "run_plan" not in old and old["layout"]["layout"] == "zigzag"
    pp2 = RunPlan(dp=1, cp=1, mp=1, pp=2, ulysses=1, seq_layout="zigzag", algo="colossalai_cp")
    assert ckpt.same_split(old, saved_plan(old)) and not ckpt.same_split(old, pp2)
    resumed = run_job(JobOptions(config=job_tree(), steps=4, resume=str(tmp_path)), model_factory=bigram_factory)
    assert [r.loss for r in resumed] == [r.loss for r in full[2:]]


def test_an_old_format_checkpoint_reshards(tmp_path):
    """``load_resharded`` of a checkpoint whose meta.json has the old ``layout`` key: written under mp 2 x pp 2,
    read for mp 1 x pp 1, every tensor equals the full state."""
    import numpy as np
    import mindspore as ms
    from mf_longseq.parallel.reshard import load_resharded
    from test_reshard import SPECS, full_state, stage_of, states_of
    source, target = RunPlan(mp=2, pp=2), RunPlan()
    full = full_state()
    files = {}
    for rank, state in states_of(full, source).items():
        files[str(rank)] = f"rank_{rank}.ckpt"
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()],
                           str(tmp_path / files[str(rank)]))
    meta = {"layout": source.as_dict(), "rank_files": files,
            "shard_specs": {name: spec.to_dict() for name, spec in SPECS.items()}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    got = load_resharded(str(tmp_path), target=target, rank=0, stage_of=stage_of)
    assert got.keys() == full.keys()
    for name, value in full.items():
        np.testing.assert_array_equal(got[name], value)
