"""Self-speculative decoding: lossless against transformers, drafts never touch the slow cache,
accepted drafts, the bonus token and the cache crop are right (a replay proposer), the draft
stream is the truncated model, bad settings refused, and sampling mode draws from the model's
own distribution."""

from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import chi2_contingency

from m2r2core.config import DecodeConfig, EngineConfig, SamplingConfig
from m2r2core.engine import Engine
from m2r2core.errors import ConfigError, M2R2Error, PromptTooLong, UnsupportedModel
from m2r2core.runtime import hf_compat
from m2r2core.runtime.decode import forward
from m2r2core.runtime.sampling import make_generator
from m2r2core.runtime.state import DecodeState
from m2r2core.spec.proposers import DraftContext, ReplayProposer
from m2r2core.spec.speculative import SpecConfig

PROMPT = "Write a short story about a lighthouse keeper."


def hf_greedy(engine: Engine, text: str, n: int) -> tuple[int, ...]:
    cfg = DecodeConfig(max_new_tokens=n, trace=False)
    ids = torch.tensor([engine.encode(text, cfg)])
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=n)
    return tuple(out[0, ids.shape[1]:].tolist())


def engine_with_trained(trained_root, model_dir) -> Engine:
    """An fp32 engine that finds its trained files under `trained_root` ($M2R2_TRAINED_DIR)."""
    old = os.environ.get("M2R2_TRAINED_DIR")
    os.environ["M2R2_TRAINED_DIR"] = str(trained_root)
    try:
        return Engine.load(EngineConfig(model=str(model_dir), dtype="float32"))
    finally:
        if old is None:
            os.environ.pop("M2R2_TRAINED_DIR")
        else:
            os.environ["M2R2_TRAINED_DIR"] = old


@pytest.fixture(scope="module")
def trained_engine(tiny_trained_dir, tiny_model_dir):
    """The tiny Llama with its briefly trained adapters and routers (fast stream available)."""
    engine = engine_with_trained(tiny_trained_dir, tiny_model_dir)
    assert engine.accel is not None
    return engine


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("spec", [SpecConfig(stream="slow", draft_layer=1, max_draft=4),
                                  SpecConfig(stream="slow", draft_layer=3, max_draft=7,
                                             min_confidence=0.01),
                                  SpecConfig(stream="slow", draft_layer=2, max_draft=4,
                                             draft_weights="int8"),
                                  SpecConfig(stream="slow", draft_layer=2, max_draft=4,
                                             narrow_verify="off")])
def test_greedy_equals_transformers_generate(tiny_model_dirs, family, spec):
    engine = Engine.load(EngineConfig(model=str(tiny_model_dirs[family]), dtype="float32"))
    want = hf_greedy(engine, PROMPT, 24)
    run = engine.speculate(PROMPT, DecodeConfig(max_new_tokens=24, trace=False), spec).run()
    assert tuple(run.tokens) == want
    assert run.stop_reason in ("eos", "max_new_tokens")
    assert sum(len(r.emitted) for r in run.rounds) == len(want)


@pytest.mark.parametrize("spec", [SpecConfig(draft_layer=1), SpecConfig(draft_layer=2,
                                                                        max_draft=6),
                                  SpecConfig(draft_layer=2, draft_vocab="sub", max_draft=3),
                                  SpecConfig(draft_layer=2, draft_vocab="sub", max_draft=4,
                                             draft_weights="int8"),
                                  SpecConfig(stream="tuned", draft_layer=2, max_draft=4),
                                  SpecConfig(stream="tuned", draft_layer=3, max_draft=3,
                                             draft_rule="confidence", draft_threshold=0.2,
                                             min_draft_layer=1)])
def test_fast_stream_drafts_are_lossless(trained_engine, spec):
    """Drafts of the fast stream (and of the tuned-lens baseline) never change the output."""
    want = hf_greedy(trained_engine, PROMPT, 30)
    run = trained_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=30, trace=False),
                                   spec).run()
    assert tuple(run.tokens) == want
    rounds = run.rounds[1:]
    assert all(0 <= r.accepted <= len(r.drafts) <= spec.max_draft for r in rounds)
    assert all(r.emitted[:r.accepted] == r.drafts[:r.accepted] for r in rounds)


@pytest.mark.parametrize("draft_rule", ["fixed", "confidence"])
def test_merged_adapters_draft_what_the_added_deltas_draft(trained_engine, draft_rule):
    """Folding the adapters into the draft blocks' weights changes only rounding (fp32 here):
    the same drafts, accepted the same way, and the slow stream's blocks are left untouched."""
    cfg = DecodeConfig(max_new_tokens=30, trace=False)
    weights = [p.clone() for p in trained_engine.parts.layers[0].parameters()]
    runs = [trained_engine.speculate(PROMPT, cfg, SpecConfig(
        draft_layer=2, max_draft=4, merge_adapters=merge, draft_rule=draft_rule,
        draft_threshold=0.2, min_draft_layer=1, draft_weights="model")).run()
        for merge in (True, False)]
    assert runs[0].tokens == runs[1].tokens == list(hf_greedy(trained_engine, PROMPT, 30))
    assert [r.drafts for r in runs[0].rounds] == [r.drafts for r in runs[1].rounds]
    assert [r.accepted for r in runs[0].rounds] == [r.accepted for r in runs[1].rounds]
    assert all(torch.equal(a, b) for a, b in zip(weights, trained_engine.parts.layers[0]
                                                 .parameters(), strict=True))
    proposer = trained_engine.speculate(PROMPT, cfg, SpecConfig(
        draft_layer=2, draft_weights="model")).loop.proposer
    merged, plain = proposer.draft_blocks[0], proposer.blocks[0]
    assert proposer.adapters == [None, None]  # nothing added on top of the folded weights
    assert not torch.equal(merged.q_proj.weight, plain.q_proj.weight)  # trained: folded in
    assert merged.q_proj.weight.dtype == plain.q_proj.weight.dtype


def test_int8_draft_weights_draft_like_the_model_weights(trained_engine):
    """int8 draft blocks and head are the model-dtype ones rounded per output channel: most
    drafts are the same, the output is the model's, and the model's own weights are untouched."""
    cfg = DecodeConfig(max_new_tokens=30, trace=False)
    weights = [p.clone() for p in trained_engine.parts.layers[0].parameters()]
    runs = [trained_engine.speculate(PROMPT, cfg, SpecConfig(draft_layer=2, max_draft=1,
                                                             draft_weights=w)).run()
            for w in ("model", "int8")]
    assert runs[0].tokens == runs[1].tokens == list(hf_greedy(trained_engine, PROMPT, 30))
    same = [a.drafts == b.drafts for a, b in zip(runs[0].rounds, runs[1].rounds, strict=False)]
    assert sum(same) >= 0.8 * len(same)
    assert all(torch.equal(a, b) for a, b in zip(weights, trained_engine.parts.layers[0]
                                                 .parameters(), strict=True))
    proposer = trained_engine.speculate(PROMPT, cfg, SpecConfig(
        draft_layer=2, draft_weights="int8")).loop.proposer
    assert proposer.draft_blocks[0].q_proj.qweight.dtype == torch.int8
    assert isinstance(proposer.blocks[0].q_proj, torch.nn.Linear)  # copy-up stays exact


def test_adaptive_length_keeps_the_unconfident_draft_and_stops_after_it():
    """A draft below the bound is already paid for: it is verified, and the chain ends there."""
    from m2r2core.spec.proposers import Draft, DraftPicker
    picker = DraftPicker(SamplingConfig(), None, 4, min_confidence=0.6, eos_ids=frozenset({3}))
    draft, gen = Draft(), torch.Generator()
    assert not picker.extend(draft, torch.tensor([0.0, 5.0, 0.0, 0.0]), gen)  # confident
    assert picker.extend(draft, torch.tensor([0.0, 0.1, 0.2, 0.0]), gen)  # unconfident: stop
    assert draft.tokens == [1, 2] and len(draft.probs) == 2 and draft.probs[1] < 0.6
    assert picker.extend(Draft(), torch.tensor([0.0, 0.0, 0.0, 9.0]), gen)  # EOS ends it too
    off = DraftPicker(SamplingConfig(), None, 4, min_confidence=0.0, eos_ids=frozenset())
    assert not off.extend(Draft(), torch.tensor([0.1, 0.2, 0.0, 0.0]), gen)


def test_rounds_record_what_happened(tiny_engine):
    """Every round: drafts within K, accepted prefix, one own token, timings measured."""
    spec = SpecConfig(stream="slow", draft_layer=3, max_draft=5)
    run = tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=40, trace=False), spec).run()
    first, rounds = run.rounds[0], run.rounds[1:]
    assert first.drafts == () and len(first.emitted) == 1 and first.verify_ms > 0
    assert rounds and all(r.draft_ms > 0 and r.verify_ms > 0 for r in rounds)
    for r in rounds:
        if run.tokens[-1] not in tiny_engine.eos_ids and r is not rounds[-1]:
            assert len(r.emitted) == r.accepted + 1
        assert r.correction == (r.accepted < len(r.drafts))
    assert [r.position for r in run.rounds] == [sum(len(x.emitted) for x in run.rounds[:i])
                                               for i in range(len(run.rounds))]
    assert len(run.tokens) <= 40 and run.decode_ms > 0


def test_budget_is_exact(tiny_engine):
    for budget in (1, 2, 3, 7):
        run = tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=budget, trace=False),
                                    SpecConfig(stream="slow", draft_layer=2, max_draft=8)).run()
        assert len(run.tokens) <= budget
        assert tuple(run.tokens) == hf_greedy(tiny_engine, PROMPT, budget)


def test_drafts_never_reach_the_slow_cache(trained_engine):
    engine = trained_engine
    cfg = DecodeConfig(max_new_tokens=8, trace=False)
    spec = SpecConfig(draft_layer=2, max_draft=5)
    loop = engine.speculate(PROMPT, cfg, spec).loop
    state = DecodeState(hf_compat.new_cache(engine.parts), make_generator(cfg.sampling))
    forward(engine.parts, loop.prompt, state, keep_states=False)
    before = [t.clone() for t in hf_compat.cached_keys_values(state.cache, 0)]
    draft = loop.proposer.propose(DraftContext([5], None, state, 5))
    assert len(draft.tokens) == 5
    after = hf_compat.cached_keys_values(state.cache, 0)
    assert hf_compat.cache_length(state.cache) == loop.prompt.shape[1]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("bad, field", [
    (SpecConfig(stream="slow", draft_layer=1, max_draft=0), "max_draft"),
    (SpecConfig(stream="slow", draft_layer=1, max_draft=1000), "max_draft"),
    (SpecConfig(stream="slow", draft_layer=0), "draft_layer"),
    (SpecConfig(stream="slow", draft_layer=4), "draft_layer"),
    (SpecConfig(stream="fast", draft_layer=1), "stream"),
    (SpecConfig(stream="tuned", draft_layer=1), "tuned lens"),
    (SpecConfig(stream="sideways"), "stream"),
    (SpecConfig(stream="slow", draft_layer=1, min_confidence=1.0), "min_confidence"),
    (SpecConfig(stream="slow", draft_layer=1, draft_vocab="sub"), "draft_vocab"),
    (SpecConfig(stream="slow", draft_layer=1, draft_weights="int4"), "draft_weights"),
])
def test_bad_settings_are_refused(tiny_engine, bad, field):
    with pytest.raises(ConfigError, match=field):
        tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4), bad)


def test_fast_draft_layer_is_bounded_by_the_adapters(trained_engine):
    depth = trained_engine.accel.first + trained_engine.accel.n_fast
    with pytest.raises(ConfigError, match=f"1..{depth}"):
        trained_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4),
                                 SpecConfig(draft_layer=depth + 1))


def test_sliding_window_models_are_refused(tiny_model_dirs):
    engine = Engine.load(EngineConfig(model=str(tiny_model_dirs["mistral"]), dtype="float32"))
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4),
                         SpecConfig(stream="slow", draft_layer=1))


def test_a_prompt_that_fills_the_context_is_refused(tiny_engine):
    long_prompt = "word " * 600  # the tiny model's context is 512
    with pytest.raises(PromptTooLong):
        tiny_engine.speculate(long_prompt, DecodeConfig(max_new_tokens=4),
                              SpecConfig(stream="slow", draft_layer=1))


def _joint_counts(draw, n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        key = draw(seed)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _chi2_p(a: dict, b: dict) -> float:
    keys = sorted(set(a) | set(b))
    table = [[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]]
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("spec", [SpecConfig(draft_layer=1, max_draft=3),
                                  SpecConfig(stream="medusa", max_draft=3)],
                         ids=["fast", "medusa"])
def test_sampling_matches_plain_sampling(trained_engine, spec):
    """Speculative rejection sampling draws (t0, t1, t2) from the same joint distribution as
    plain sampling (two-sample chi-square over 400 seeds each), while drafts alone do not."""
    engine = trained_engine
    sampling = dict(temperature=1.0, top_k=4)

    def cfg(seed):
        return DecodeConfig(max_new_tokens=3, trace=False,
                            sampling=SamplingConfig(seed=seed, **sampling))

    def plain(seed):
        return engine.run(PROMPT, cfg(seed)).trace.token_ids

    def speculative(seed):
        return tuple(engine.speculate(PROMPT, cfg(seed + 10_000), spec).run().tokens)

    def drafts_only(seed):  # what sampling would give if every draft were kept
        run = engine.speculate(PROMPT, cfg(seed + 20_000).replace(max_new_tokens=6), spec)
        rounds = run.run().rounds
        return (rounds[0].emitted[0], *rounds[1].drafts[:2]) if len(rounds[1].drafts) >= 2 \
            else ("short",)

    n = 400
    reference = _joint_counts(plain, n)
    same, drafts = (_chi2_p(reference, _joint_counts(speculative, n)),
                    _chi2_p(reference, _joint_counts(drafts_only, n)))
    print(f"chi-square p: speculative {same:.3g}, drafts only {drafts:.3g}")
    assert same > 0.001
    assert drafts < 0.001  # the test has power: it tells the draft distribution apart


@pytest.mark.parametrize("spec", [
    SpecConfig(draft_layer=2, max_draft=4, draft_rule="confidence", draft_threshold=0.02,
               min_draft_layer=1),
    SpecConfig(draft_layer=2, max_draft=4, draft_rule="arla", draft_threshold=0.5,
               min_draft_layer=1),
    SpecConfig(stream="slow", draft_layer=3, max_draft=5, draft_rule="static",
               draft_threshold=0.3, min_draft_layer=1),
])
def test_router_chosen_draft_depths_are_lossless(trained_engine, spec):
    want = hf_greedy(trained_engine, PROMPT, 30)
    run = trained_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=30, trace=False),
                                   spec).run()
    assert tuple(run.tokens) == want
    for r in run.rounds[1:]:
        assert len(r.draft_depths) == len(r.drafts)
        assert all(spec.min_draft_layer <= d <= spec.draft_layer for d in r.draft_depths)


def test_static_rule_exits_where_it_says(trained_engine):
    """The static rule scores depth/D: at threshold 0.3 of 3 slow blocks every draft exits at
    depth 1; at 1.0 no draft exits early, and drafts equal the fixed-depth ones."""
    cfg = DecodeConfig(max_new_tokens=20, trace=False)

    def rounds(**kw):
        spec = SpecConfig(stream="slow", draft_layer=3, max_draft=3, min_draft_layer=1, **kw)
        return trained_engine.speculate(PROMPT, cfg, spec).run().rounds[1:]

    early = rounds(draft_rule="static", draft_threshold=0.3)
    assert all(set(r.draft_depths) <= {1} for r in early) and any(r.drafts for r in early)
    never, fixed = rounds(draft_rule="static", draft_threshold=1.0), rounds()
    assert [r.drafts for r in never] == [r.drafts for r in fixed]
    assert all(set(r.draft_depths) <= {3} for r in never)


@pytest.mark.parametrize("bad, field", [
    (SpecConfig(stream="slow", draft_layer=2, draft_rule="bogus"), "draft_rule"),
    (SpecConfig(stream="slow", draft_layer=2, draft_rule="confidence", draft_threshold=1.5),
     "draft_threshold"),
    (SpecConfig(stream="slow", draft_layer=2, draft_rule="confidence", min_draft_layer=3),
     "min_draft_layer"),
])
def test_bad_draft_rules_are_refused(tiny_engine, bad, field):
    with pytest.raises(ConfigError, match=field):
        tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4), bad)


def test_a_learned_draft_rule_needs_trained_routers(tiny_engine):
    with pytest.raises(M2R2Error, match="No trained 'arla' router"):
        tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4),
                              SpecConfig(stream="slow", draft_layer=2, draft_rule="arla"))


def _replay(engine, continuation, max_draft, budget, greedy=True, seed=0):
    cfg = DecodeConfig(max_new_tokens=budget, trace=False,
                       sampling=SamplingConfig() if greedy else SamplingConfig(1.0, seed=seed))
    proposer = ReplayProposer(continuation, engine.parts.lm_head.weight.shape[0], greedy)
    return engine.speculate(PROMPT, cfg, SpecConfig(stream="slow", draft_layer=1,
                                                    max_draft=max_draft), proposer=proposer).run()


@pytest.mark.parametrize("max_draft", [1, 3, 5])
def test_replayed_own_continuation_is_accepted_whole_with_a_bonus(tiny_engine, max_draft):
    """Drafts that are the model's own greedy tokens are all accepted; every round then adds
    the model's bonus token, so a round emits K+1 tokens and the cache crop keeps them all."""
    want = hf_greedy(tiny_engine, PROMPT, 24)
    run = _replay(tiny_engine, list(want), max_draft, len(want))
    assert tuple(run.tokens) == want
    for r in run.rounds[1:-1]:
        assert r.accepted == len(r.drafts) == max_draft and not r.correction
        assert len(r.emitted) == max_draft + 1
    assert len(run.rounds) - 1 == -(-(len(want) - 1) // (max_draft + 1))


def test_an_edited_draft_is_refused_at_exactly_that_token(tiny_engine):
    """Replaying the continuation with token j changed: the round that drafts j accepts exactly
    the drafts before it, emits the model's own token as a correction, and the cache crop
    leaves later rounds exact (the whole output is still transformers' greedy output)."""
    want = hf_greedy(tiny_engine, PROMPT, 24)
    edited = list(want)
    j = 9
    edited[j] = (want[j] + 1) % tiny_engine.parts.lm_head.weight.shape[0]
    run = _replay(tiny_engine, edited, 4, len(want))
    assert tuple(run.tokens) == want
    hit = [r for r in run.rounds[1:] if r.position <= j < r.position + len(r.drafts)]
    assert len(hit) == 1
    r = hit[0]
    assert r.accepted == j - r.position and r.correction and r.emitted[-1] == want[j]
    assert all(x.accepted == len(x.drafts) for x in run.rounds[1:] if x is not r)


def test_point_mass_drafts_keep_sampling_exact(tiny_engine):
    """A replayed draft has q = 1 on itself: it is kept with probability p(x), and a refused one
    is replaced from p without x. With the model's own sampled continuation as drafts (same
    seed), every round is accepted whole unless the sampler disagrees; tokens stay valid."""
    run = _replay(tiny_engine, [5] * 16, 3, 16, greedy=False, seed=1)
    assert 1 <= len(run.tokens) <= 16
    assert all(0 <= r.accepted <= len(r.drafts) for r in run.rounds[1:])


@pytest.fixture(scope="module")
def mixing_engine(tmp_path_factory, tiny_model_dir):
    """A tiny Llama whose blocks outweigh its embedding (initializer range 0.3), so that a
    truncated model does not just copy its input token as the default tiny models do."""

    from .conftest import save_tiny_model, tiny_config

    config = tiny_config("llama")
    config.initializer_range = 0.3
    folder = save_tiny_model(config, tmp_path_factory.mktemp("tiny-mixing"), tiny_model_dir,
                             seed=1)
    return Engine.load(EngineConfig(model=str(folder), dtype="float32"))


@pytest.mark.parametrize("draft_layer", [1, 3])
def test_slow_draft_chain_is_the_truncated_model_greedy(mixing_engine, draft_layer):
    """The slow draft stream at depth d is the model cut to its first d blocks: a chain of K
    drafts equals transformers' greedy decoding of that truncated model, token for token (each
    draft row is fed the draft before it). The drafts use the model's own weights here; int8
    drafts may differ in near-ties, and only verification is promised exact."""
    import copy

    engine = mixing_engine
    cfg = DecodeConfig(max_new_tokens=8, trace=False)
    ids = engine.encode(PROMPT, cfg)
    truncated = copy.deepcopy(engine.model)
    truncated.model.layers = truncated.model.layers[:draft_layer]
    truncated.config.num_hidden_layers = draft_layer
    if getattr(truncated.config, "layer_types", None):
        truncated.config.layer_types = truncated.config.layer_types[:draft_layer]
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = truncated.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 do_sample=False, max_new_tokens=6, min_new_tokens=6)
    want = out[0, len(ids):].tolist()
    assert len(set(want)) >= 3, want  # a chain that a repeated input token would not give
    loop = engine.speculate(PROMPT, cfg, SpecConfig(stream="slow", draft_layer=draft_layer,
                                                    max_draft=6, draft_weights="model")).loop
    state = DecodeState(hf_compat.new_cache(engine.parts), make_generator(cfg.sampling))
    forward(engine.parts, torch.tensor([ids[:-1]]), state, keep_states=False)
    draft = loop.proposer.propose(DraftContext([ids[-1]], None, state, 6))
    assert draft.tokens == want[:len(draft.tokens)] and len(draft.tokens) >= 3


def test_capabilities_say_what_is_loaded(trained_engine, tiny_engine):
    """Pages ask the engine what it can do instead of probing its internals."""
    bare = tiny_engine.capabilities()
    assert bare.streams == ("slow",) and bare.draft_streams == ("slow",)
    assert bare.fast_depth is None and bare.medusa_heads is None and not bare.sub_vocab
    assert not bare.has_rule("arla", "slow") and bare.has_rule("confidence", "slow")
    assert bare.max_depth("slow") == tiny_engine.parts.n_layers
    caps = trained_engine.capabilities()
    assert caps.streams == ("fast", "slow", "tuned")
    assert caps.draft_streams == ("fast", "slow", "tuned", "medusa")
    assert not caps.has_rule("arla", "tuned") and caps.has_rule("confidence", "tuned")
    assert caps.max_depth("tuned") == trained_engine.parts.n_layers
    assert caps.fast_depth == trained_engine.accel.max_depth == caps.max_depth("fast")
    assert caps.medusa_heads == trained_engine.medusa.n_heads and caps.sub_vocab
    assert caps.has_rule("arla", "fast") and caps.has_rule("mlp", "slow")
    assert caps.rate == trained_engine.accel.config.rate
