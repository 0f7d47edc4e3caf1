"""Context parallelism composed with data, model and pipeline parallelism, trained for real on 4 CPU ranks.

One msrun launch (``compose_worker.py``) trains a tiny LLaMA2 with GQA for 5 steps in dp2 x cp2, mp2 x cp2,
pp2 x cp2 (1F1B, 2 micro-batches; also on packed documents), cp2 Ulysses under mp2 and mp4 (kv heads
replicated).  The oracle is the same training on one rank, run here in the pytest process: losses and the final weights (every rank's shards
merged with ``reshard.merge_rank_states``) must agree within 1e-5 relative.

The user's path, ``run_job`` (``mf-longseq train``), runs in the same launch: pp2 x cp2 for 3 steps equals the
one-rank ``run_job``; a run under mp2 x cp2 saves at step 3 and resumes under cp4 (in the launch) and on one rank
(here), as does the pp2 x cp2 checkpoint; steps 4-5 equal those of an uninterrupted one-rank run.  A pp2 checkpoint
of a YAML without ``num_layers`` (the model's default count; its own 2-rank launch) resumes on one rank too.

The validation rules of the composition are tested here too, each with its exact message.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest

import compose_worker as cw
from mf_longseq.config import LongSeqConfig, check_world_size
from run_settings import checked_settings
from mf_longseq.parallel.plan import RunPlan
from mf_longseq.parallel.reshard import merge_rank_states
from mf_longseq.parallel.tensor_parallel import ShardSpec

WORKER = Path(__file__).with_name("compose_worker.py")
RTOL = 1e-5


def rel_err(got, want) -> float:
    """max |got - want| / max |want|: the error relative to the tensor's scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.fixture(scope="module")
def launch(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compose")
    msrun(WORKER, [out_dir], workers=cw.WORLD, timeout=1500)
    return out_dir


@pytest.fixture(scope="module")
def reference():
    """One rank, same data, same init: losses, final weights, and the loss of the step after them."""
    losses, trainer = cw.train_case(None, single=True)
    state = cw.trained_state(trainer)
    next_loss = trainer.step(cw.STEPS).loss
    return {"losses": losses, "state": state, "next_loss": next_loss}


def merged_weights(out_dir, name):
    dp, mp, cp, pp, _, _ = cw.CASES[name]
    layout = RunPlan(dp=dp, cp=cp, mp=mp, pp=pp)
    shards = [np.load(out_dir / name / f"rank{r}.npz") for r in range(cw.WORLD)]
    specs = {k: ShardSpec.from_dict(v) for k, v in json.loads(str(shards[0]["specs"])).items()}
    states = {r: {k[len("state/"):]: sh[k] for k in sh.files if k.startswith("state/")}
              for r, sh in enumerate(shards)}
    return shards, merge_rank_states(states, layout, specs)


@pytest.mark.dist
@pytest.mark.parametrize("name", list(cw.CASES))
def test_layout_trains_like_one_rank(name, launch, reference):
    shards, full = merged_weights(launch, name)
    for rank, shard in enumerate(shards):
        errors = [rel_err(a, b) for a, b in zip(shard["losses"], reference["losses"])]
        assert max(errors) <= RTOL, f"{name} rank {rank}: losses {shard['losses']} vs {reference['losses']}"
    weights = {k: v for k, v in reference["state"].items() if not k.startswith("adam_")}
    assert sorted(k for k in full if not k.startswith("adam_")) == sorted(weights)
    worst = max((rel_err(full[k], w), k) for k, w in weights.items())
    assert worst[0] <= RTOL, f"{name}: weight {worst[1]} differs by {worst[0]:.2e} relative"
    assert rel_err(reference["losses"][-1], reference["losses"][0]) > 1e-3     # the weights did move


@pytest.mark.dist
@pytest.mark.parametrize("name", list(cw.PACKED_CASES))
def test_packed_documents_through_pipeline_stages_train_like_one_rank(name, launch):
    """Packed documents under pp2 x cp2: every stage reads the micro-batch's document ids (ShardedBatch), so the
    losses equal one rank trained on the same packed samples, and differ from the same samples unpacked."""
    packed, _ = cw.train_case(None, single=True, packed=True)
    unpacked, _ = cw.train_case(None, single=True)
    assert rel_err(packed[0], unpacked[0]) > 1e-4                          # the documents change the loss
    for rank in range(cw.WORLD):
        got = np.load(launch / name / f"rank{rank}.npz")["losses"]
        errors = [rel_err(a, b) for a, b in zip(got, packed)]
        assert len(got) == len(packed) and max(errors) <= RTOL, f"{name} rank {rank}: {got} vs {packed}"


# ------------------------------------------------------------------------------ the user path: run_job
@pytest.fixture(scope="module")
def job_reference():
    """Losses of steps 1..JOB_STEPS of the one-rank run_job of the same config."""
    from mf_longseq.train.job import JobOptions, run_job
    return [r.loss for r in run_job(JobOptions(config=cw.tiny_tree(), steps=cw.JOB_STEPS), stream=io.StringIO())]


def job_log(out_dir, name, rank):
    return json.loads((out_dir / name / f"rank{rank}.json").read_text())


def job_checkpoint(out_dir, name):
    from mf_longseq.train.checkpoint import step_dir
    return Path(step_dir(str(cw.run_dir(str(out_dir), name)), cw.JOB_SAVE_STEP))


def assert_losses(got, want, what):
    errors = [rel_err(a, b) for a, b in zip(got, want)]
    assert len(got) == len(want) and max(errors) <= RTOL, f"{what}: {got} vs {want}"


@pytest.mark.dist
@pytest.mark.parametrize("name", ["job_pp2_cp2", "job_mp2_cp2"])
def test_run_job_layout_equals_one_rank(name, launch, job_reference):
    for rank in range(cw.WORLD):
        log = job_log(launch, name, rank)
        assert log["steps"] == list(range(1, cw.JOB_SAVE_STEP + 1))
        assert_losses(log["losses"], job_reference[:cw.JOB_SAVE_STEP], f"{name} rank {rank}")
    assert rel_err(job_reference[cw.JOB_SAVE_STEP - 1], job_reference[0]) > 1e-4          # the weights did move


@pytest.mark.dist
def test_pipeline_checkpoint_holds_each_stage_only(launch):
    import mindspore as ms
    directory = job_checkpoint(launch, "job_pp2_cp2")
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["run_plan"]["pp"], meta["run_plan"]["cp"], meta["num_layers"]) == (2, 2, 2)
    stage_weights = {0: {"model.embed_tokens.weight"}, 1: {"model.norm.weight", "lm_head.weight"}}
    for rank in range(cw.WORLD):
        stage = rank // 2                                              # rank = stage * (dp*cp*mp) + ...
        names = set(ms.load_checkpoint(str(directory / f"rank_{rank}.ckpt")))
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == {stage}, (rank, sorted(names))
        assert stage_weights[stage] <= names and not stage_weights[1 - stage] & names, (rank, sorted(names))
        weights = {n for n in names if not n.startswith("adam_")}
        assert names == weights | {f"adam_m.{n}" for n in weights} | {f"adam_v.{n}" for n in weights}


@pytest.mark.dist
def test_mp2_cp2_checkpoint_resumes_under_cp4(launch, job_reference):
    meta = json.loads((job_checkpoint(launch, "job_mp2_cp2") / "meta.json").read_text())
    assert meta["run_plan"]["mp"] == 2 and meta["shard_specs"]["lm_head.weight"]["kind"] == "split"
    for rank in range(cw.WORLD):
        log = job_log(launch, "job_resume_cp4", rank)
        assert log["steps"] == list(range(cw.JOB_SAVE_STEP + 1, cw.JOB_STEPS + 1))
        assert_losses(log["losses"], job_reference[cw.JOB_SAVE_STEP:], f"cp4 resume rank {rank}")


@pytest.mark.dist
@pytest.mark.parametrize("name", ["job_mp2_cp2", "job_pp2_cp2"])
def test_checkpoint_resumes_on_one_rank(name, launch, job_reference, tmp_path):
    from mf_longseq.train.job import JobOptions, run_job
    records = run_job(JobOptions(config=cw.tiny_tree(), steps=cw.JOB_STEPS, output_dir=str(tmp_path),
                                 resume=str(job_checkpoint(launch, name))), stream=io.StringIO())
    assert [r.step for r in records] == list(range(cw.JOB_SAVE_STEP + 1, cw.JOB_STEPS + 1))
    assert_losses([r.loss for r in records], job_reference[cw.JOB_SAVE_STEP:], f"{name} resumed on one rank")


@pytest.fixture(scope="module")
def default_layers_launch(msrun, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("default_layers")
    msrun(WORKER, [out_dir, "--default-layers"], workers=2, timeout=1500)
    return out_dir


@pytest.mark.dist
def test_pipeline_checkpoint_of_yaml_without_num_layers_reshards_to_one_stage(default_layers_launch, tmp_path):
    """A YAML that omits ``num_layers`` builds the config class's default (32 layers). The pp2 checkpoint
    records the built count in meta.json, so it reshards to one stage and resumes like an uninterrupted one-rank
    run (issue 21: the count was read from the YAML, None, and the checkpoint could not be resharded)."""
    from mf_longseq.config import DEFAULT_NUM_LAYERS
    from mf_longseq.train.checkpoint import step_dir
    from mf_longseq.train.job import JobOptions, run_job
    launch, name, saved = default_layers_launch, "job_pp2_default_layers", cw.DEFAULT_LAYERS_SAVE_STEP
    steps = saved + 1
    directory = Path(step_dir(str(cw.run_dir(str(launch), name)), saved))
    reference = [r.loss for r in run_job(JobOptions(config=cw.default_layers_tree(), steps=steps),
                                         stream=io.StringIO())]
    records = run_job(JobOptions(config=cw.default_layers_tree(), steps=steps, output_dir=str(tmp_path),
                                 resume=str(directory)), stream=io.StringIO())
    assert [r.step for r in records] == list(range(saved + 1, steps + 1))
    assert_losses([r.loss for r in records], reference[saved:], f"{name} resumed on one rank")
    for rank in range(2):
        assert_losses(job_log(launch, name, rank)["losses"], reference[:saved], f"{name} rank {rank}")
    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["run_plan"]["pp"], meta["num_layers"]) == (2, DEFAULT_NUM_LAYERS)


@pytest.mark.dist
def test_world_size_mismatch_is_refused_under_msrun(launch):
    message = str(np.load(launch / "world_size" / "rank0.npz")["message"])
    assert message == WORLD_SIZE_MESSAGE


# ------------------------------------------------------------------------------ validation, in this process
WORLD_SIZE_MESSAGE = (
    "long_seq.device_num = 8: data_parallel x model_parallel x context_parallel x pipeline_stage = 2 x 1 x 2 x 2 "
    "= 8, but 4 ranks were started. Fix: launch msrun with --worker_num 8, or change the parallel degrees so that "
    "their product is 4.")


def test_world_size_check_names_the_product_and_the_fix():
    config = LongSeqConfig.from_mindformers(cw.tiny_tree(dp=2, cp=2, pp=2, micro=2))
    with pytest.raises(ValueError) as err:
        check_world_size(config, 4)
    assert str(err.value) == WORLD_SIZE_MESSAGE
    check_world_size(config, 8)


BASE = dict(seq_length=64, num_heads=8, num_kv_heads=2, num_layers=4)


@pytest.mark.parametrize("kw, message", [
    (dict(data_parallel=2, model_parallel=2, context_parallel=2, device_num=4),
     "long_seq.device_num = 4: device_num must equal data_parallel x model_parallel x context_parallel x "
     "pipeline_stage = 2 x 2 x 2 x 1 = 8. Fix: change the parallel degrees so that their product is the number "
     "of devices."),
    (dict(model_parallel=4, context_parallel=2, use_seq_parallel=True, seq_length=36),
     "model.model_config.seq_length = 36: parallel_config.use_seq_parallel splits each rank's seq_length / "
     "context_parallel tokens over model_parallel = 4 ranks, so seq_length must be divisible by context_parallel "
     "x model_parallel = 8. Fix: use a seq_length divisible by 8, or set parallel_config.use_seq_parallel: False."),
    (dict(pipeline_stage=4, micro_batch_num=2),
     "parallel_config.micro_batch_num = 2: must be >= parallel_config.pipeline_stage = 4. Fix: set "
     "micro_batch_num to 4 or more."),
    (dict(num_layers=2, pipeline_stage=4, micro_batch_num=4),
     "parallel_config.pipeline_stage = 4: more stages than model.model_config.num_layers = 2. Fix: use at most 2 "
     "stages."),
])
def test_composition_rules(kw, message):
    with pytest.raises(ValueError) as err:
        checked_settings(**{**BASE, **kw})
    assert str(err.value) == message
