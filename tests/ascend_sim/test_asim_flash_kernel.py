"""FlashKernel forward + backward on the simulated Ascend (cases in ``cases_flash.py``)."""
import pytest

from asim_harness import cases_of, check_case

# What plan_flash_calls can emit (flash_args' module docstring table): (input_layout, sparse_mode, attn_mask kind).
EMITTED_KINDS = {("BNSD", 0, "none"), ("BNSD", 0, "dense"), ("BNSD", 2, "compressed"), ("BNSD", 3, "compressed"),
                 ("TND", 3, "compressed")}
BAD_ARGUMENT = ("flash", "bad_argument_kv_heads")
# MindSpore 2.9's own infer error (mindspore/ops/infer/ops_func_impl/flash_attention_score.cc).
BAD_ARGUMENT_MESSAGE = ("FlashAttentionScore: The head num of 'key' must be a factor of the head num of 'query', "
                        "but got 3 and 8")


@pytest.mark.parametrize("sim_case", cases_of("cases_flash", lambda b, name: (b, name) != BAD_ARGUMENT))
def test_flash_kernel(sim, sim_case):
    check_case(sim, sim_case)


@pytest.mark.parametrize("sim_case", [pytest.param(BAD_ARGUMENT, id="flash:bad_argument_kv_heads")])
def test_bad_argument_raises_mindspore_ascend_error(sim, sim_case):
    record = sim.result(*sim_case)
    assert not record["ok"], "kv heads 3 for 8 query heads passed FlashAttentionScore's infer"
    assert record["error"].startswith("RuntimeError: " + BAD_ARGUMENT_MESSAGE), record["error"]


def test_every_emitted_call_kind_ran(sim):
    """The single-call cases together ran every kind of call flash_args can plan, forward and backward."""
    ran = set()
    for (batch, name) in (p.values[0] for p in cases_of("cases_flash")):
        record = sim.result(batch, name)
        if record["ok"]:
            ran |= {tuple(kind) for kind in record["info"].get("kinds", [])}
    assert ran == EMITTED_KINDS, f"ran {sorted(ran)}; flash_args emits {sorted(EMITTED_KINDS)}"
