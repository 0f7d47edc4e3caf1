"""MindSpore's Ascend memory pool against the planner's prediction (cases in ``cases_planner.py``): layer-input
offload saves what the planner says, and LLaMA2-7B-sized layers at S = 32k per rank peak where it says."""
import pytest

from asim_harness import cases_of, check_case


@pytest.mark.parametrize("sim_case", cases_of("cases_planner"))
def test_pool_peak_against_planner(sim, sim_case):
    record = check_case(sim, sim_case)
    print(record.get("info"))
