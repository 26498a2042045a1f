"""The speedup ledger: a hand-made run whose speedup is known, the break-even solver, and a real
speculative comparison whose predicted speedup tracks the measured one."""

import pytest

from analysis import compare, ledger
from m2r2core.config import DecodeConfig
from m2r2core.spec.speculative import SpecConfig
from m2r2core.trace import SpecRound, TokenStep


def _round(index: int, drafts: int, accepted: int, draft_ms: float, verify_ms: float):
    emitted = tuple(range(accepted + 1))
    return SpecRound(index, 0, tuple(range(drafts)), ("x",) * drafts, (0.5,) * drafts, accepted,
                     emitted, ("x",) * len(emitted), accepted < drafts, draft_ms, verify_ms)


def test_a_known_run():
    rounds = [_round(0, 0, 0, 0.0, 30.0)] + [_round(i, 4, 2, 8.0, 12.0) for i in range(1, 6)]
    spec_ms = (8.0 + 12.0) / 3  # every round: 20 ms for 3 tokens
    book = ledger.spec_ledger(rounds, plain_ms=10.0, spec_ms=spec_ms)
    assert (book.mean_drafted, book.mean_accepted) == (4.0, 2.0)
    assert book.draft_cost == pytest.approx(0.2) and book.verify_cost == pytest.approx(1.2)
    assert book.measured_speedup == pytest.approx(1.5)
    assert book.predicted_speedup == pytest.approx(1.5)
    assert book.time_ms["the rest"] == pytest.approx(0.0)
    assert book.needed_accepted(2.0) == pytest.approx(3.0)
    alpha = book.needed_acceptance(2.0, 4)
    assert ledger.expected_accepted(alpha, 4) == pytest.approx(3.0, abs=1e-9)
    assert book.needed_acceptance(10.0, 4) is None  # more than every draft accepted
    assert book.needed_acceptance(0.3, 4) == 0.0


def test_the_solver_inverts_the_chain():
    for alpha in (0.1, 0.5, 0.9):
        assert ledger.acceptance_for(ledger.expected_accepted(alpha, 5), 5) == pytest.approx(alpha)


def test_a_real_run(tiny_engine):
    run = compare.compare_spec(tiny_engine, "Tell me about the sea.",
                               DecodeConfig(max_new_tokens=24),
                               SpecConfig(stream="slow", draft_layer=2, max_draft=4), False)
    book = ledger.spec_ledger(run.rounds, run.plain_ms, run.spec_ms)
    assert book.rounds == len(run.rounds) - 1
    assert sum(book.time_ms.values()) == pytest.approx(run.spec_ms * (len(run.spec_tokens) - 1))
    # the formula leaves out only the bookkeeping between rounds
    assert book.predicted_speedup >= book.measured_speedup * 0.95


def test_an_early_exit_run(tiny_engine):
    from m2r2core.exits.early_exit import ExitConfig
    from m2r2core.exits.routers import ExitRule

    run = compare.compare_exit(tiny_engine, "Tell me about the sea.",
                               DecodeConfig(max_new_tokens=16),
                               ExitConfig(ExitRule("confidence", "slow", 0.2, 2)))
    book = ledger.exit_ledger(run.exit_steps, run.costs, run.plain_ms, run.exit_ms, 2)
    n = tiny_engine.parts.n_layers
    assert book.tokens == len(run.exit_steps) - 1 and 1 <= book.mean_depth <= n
    assert run.costs["block_calls"] > 0 and book.block_cost > 0
    assert sum(book.time_ms.values()) == pytest.approx(run.costs["decode_ms"])
    assert book.predicted_speedup > 0 and book.measured_speedup > 0
    depth = book.needed_depth(book.predicted_speedup)
    assert depth == pytest.approx(book.mean_depth, rel=0.35)  # checks modelled as linear
    assert book.needed_depth(1000.0) is None


def test_check_depths_change_what_a_target_needs():
    """With checks at named depths, the depth a target needs keeps this run's checks per token;
    with a check at every depth, each shallower depth also saves a check."""
    costs = {"blocks_ms": 300.0, "checks_ms": 20.0, "head_ms": 10.0, "fill_ms": 0.0,
             "block_calls": 300, "checks": 40, "decode_ms": 330.0}
    steps = [TokenStep(position=i, token_id=1, text="a", token_prob=1.0, exit_layer=30,
                       source="fallback", latency_ms=0.0, forward_ms=0.0, trace_ms=0.0)
             for i in range(11)]
    every = ledger.exit_ledger(steps, costs, 30.0, 33.0, 4)
    named = ledger.exit_ledger(steps, costs, 30.0, 33.0, 4, (8, 12, 15, 17))
    assert named.depths == (8, 12, 15, 17) and every.depths == ()
    # 4 checks a token at 1/60 of a step each, the head 1/30, a block 1/30
    budget = 1.0 - 1 / 30 - 4 / 60
    assert named.needed_depth(1.0) == pytest.approx(budget * 30)
    assert every.needed_depth(1.0) == pytest.approx((1.0 - 1 / 30 + 3 / 60) / (1 / 30 + 1 / 60))
