"""The differential harness's bookkeeping and report (no vLLM needed)."""

from simulator.engine.native import SchedulerOutput
from simulator.engine.scheduler_diff import Decision, Divergence, _tally


def decision(scheduled, preempted=(), step=0):
    return Decision(step, 1.5, tuple(scheduled), tuple(preempted))


def test_a_decision_is_the_ordered_batch_and_the_preemptions():
    out = SchedulerOutput(step=3)
    out.num_scheduled.update({4: 1, 2: 100})
    out.preempted.append(7)
    d = Decision.of(out, 3, 0.25)
    assert d.scheduled == ((4, 1), (2, 100)) and d.preempted == (7,)
    assert d.same_as(decision([(4, 1), (2, 100)], [7]))
    assert not d.same_as(decision([(2, 100), (4, 1)], [7]))  # order matters
    assert not d.same_as(decision([(4, 1), (2, 99)], [7]))  # token counts matter
    assert not d.same_as(decision([(4, 1), (2, 100)]))  # preemptions matter
    assert Decision.of(None, 5, 0.0).scheduled == ()


def test_the_divergence_report_names_what_differs():
    native = decision([(0, 1), (13, 122), (14, 97)])
    vllm = decision([(0, 1), (13, 106), (14, 97)], [9])
    diff = Divergence(444, native, vllm)
    assert diff.differences() == "13: native 122, vllm 106; preempted: native [], vllm [9]"
    text = diff.format()
    assert "step 444" in text
    assert "native: 3 reqs, 220 tokens: 0:1 13:122 14:97 | preempted: -" in text
    assert "vllm:   3 reqs, 204 tokens: 0:1 13:106 14:97 | preempted: 9" in text
    reordered = Divergence(1, decision([(1, 1), (2, 1)]), decision([(2, 1), (1, 1)]))
    assert reordered.differences() == "same requests and counts, different order"


def test_long_batches_are_elided_in_the_report():
    d = decision([(i, 1) for i in range(100)])
    assert d.describe().endswith("... (+76) | preempted: -")


def test_agreement_counts_steps_and_keeps_the_first_divergences():
    same = decision([(0, 1)])
    other = decision([(0, 2)])
    pairs = [(same, same)] * 7 + [(same, other)] * 3
    agreement = _tally("lockstep", pairs, keep=2)
    assert (agreement.steps, agreement.agreeing) == (10, 7)
    assert agreement.rate == 0.7
    assert [d.index for d in agreement.divergences] == [7, 8]
    report = agreement.format(max_divergences=1)
    assert report.startswith("lockstep: 7/10 steps agree (70.00%)")
    assert "first 1 of 3 divergent steps:" in report
