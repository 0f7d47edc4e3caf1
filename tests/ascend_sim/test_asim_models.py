"""One training step per model family, and one decoder layer per template (cases in ``cases_model.py``); one
step of MindFormers' own Trainer route with ``MFTrainOneStepCell`` (loss scaling, clipping) on rank 0 of cp = 2
(``cases_mf_route.py``).
"""
import pytest

from asim_harness import cases_of, check_case
from asim_worker import all_cases
from cases_model import template_files


@pytest.mark.parametrize("sim_case", cases_of("cases_model", lambda b, name: not b.startswith("templates_")))
def test_training_step(sim, sim_case):
    check_case(sim, sim_case)


@pytest.mark.parametrize("sim_case", cases_of("cases_mf_route"))
def test_mindformers_trainer_route_step(sim, sim_case):
    check_case(sim, sim_case)


@pytest.mark.parametrize("sim_case", cases_of("cases_model", lambda b, name: b.startswith("templates_")))
def test_template_decoder_layer(sim, sim_case):
    check_case(sim, sim_case)


def test_every_template_has_a_case():
    names = {name for b, name in all_cases("cases_model") if b.startswith("templates_")}
    assert names == set(template_files()) and len(names) >= 29, sorted(set(template_files()) ^ names)
