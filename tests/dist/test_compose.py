"""Context parallelism composed with data, model and pipeline parallelism, trained for real on 4 CPU ranks.

One msrun launch (``compose_worker.py``) trains a tiny LLaMA2 with GQA for 5 steps in dp2 x cp2, mp2 x cp2,
pp2 x cp2 (1F1B, 2 micro-batches), cp2 Ulysses under mp2 and mp4 (kv heads replicated).  The oracle is the
same training on one rank, run here in the pytest process: losses and the final weights (every rank's shards
merged with ``reshard.merge_rank_states``) must agree within 1e-5 relative.  A checkpoint saved under
mp2 x cp2 is loaded under cp4 (in the launch) and on one rank (here): the next-step loss is the same.

The validation rules of the composition are tested here too, each with its exact message.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import compose_worker as cw
from mf_longseq.config import LongSeqConfig, check_world_size
from mf_longseq.parallel.reshard import RankLayout, merge_rank_states
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
    layout = RankLayout(dp=dp, cp=cp, mp=mp, pp=pp)
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
def test_checkpoint_mp2_cp2_resumes_under_cp4_and_one_rank(launch, reference):
    saved = float(np.load(launch / "mp2_cp2" / "rank0.npz")["next_loss"])
    cp4 = [float(np.load(launch / "resume_cp4" / f"rank{r}.npz")["next_loss"]) for r in range(cw.WORLD)]
    one = cw.resume_next_loss(str(launch / "ckpt_mp2_cp2"), cw.tiny_tree(), rank=0)
    for loss in cp4 + [one]:
        assert rel_err(loss, saved) <= 1e-6, (saved, cp4, one)
    assert rel_err(saved, reference["next_loss"]) <= RTOL


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
    (dict(model_parallel=2, context_parallel=2, use_seq_parallel=True),
     "parallel_config.use_seq_parallel = True: Megatron sequence parallel cannot be combined with "
     "context_parallel = 2. Fix: set parallel_config.use_seq_parallel: False."),
    (dict(pipeline_stage=4, micro_batch_num=2),
     "parallel_config.micro_batch_num = 2: must be >= parallel_config.pipeline_stage = 4. Fix: set "
     "micro_batch_num to 4 or more."),
    (dict(num_layers=2, pipeline_stage=4, micro_batch_num=4),
     "parallel_config.pipeline_stage = 4: more stages than model.model_config.num_layers = 2. Fix: use at most 2 "
     "stages."),
])
def test_composition_rules(kw, message):
    with pytest.raises(ValueError) as err:
        LongSeqConfig(**{**BASE, **kw})
    assert str(err.value) == message
