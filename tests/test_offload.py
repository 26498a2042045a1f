"""Expert tiers, predictors and offloaded decoding on a tiny Mixtral: outputs equal transformers'
with every expert resident, whatever the predictor, policy or capacity; bad settings and bad
expert files are refused clearly."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from m2r2core.config import DecodeConfig, EngineConfig, SamplingConfig
from m2r2core.engine import Engine
from m2r2core.errors import AssetMissing, ConfigError, UnsupportedModel
from m2r2core.moe.channel import PRESETS, Bandwidth
from m2r2core.moe.experts import ExpertCache
from m2r2core.moe.offload import OffloadConfig, OffloadedExperts, OffloadEngine
from m2r2core.moe.prefetch import PREDICTORS, RouteAccelerator, recall_by_distance
from m2r2core.moe.store import ExpertStore

PROMPT = "Tell me about the sea and the ships."
FAST = "pcie4"


@pytest.fixture(scope="module")
def offload(tiny_model_dirs, tmp_path_factory) -> OffloadEngine:
    """The tiny Mixtral (4 layers × 4 experts, top-2) with its experts in a store."""
    engine = Engine.load(EngineConfig(model=str(tiny_model_dirs["mixtral"]), dtype="float32"))
    torch.manual_seed(0)
    accel = RouteAccelerator(4, 64, 4)  # untrained but non-trivial: predictions differ from pregate
    accel.b.data.normal_(0, 0.1)
    return OffloadEngine(engine, store=tmp_path_factory.mktemp("store"), accelerator=accel)


@pytest.fixture(scope="module")
def reference(offload):
    """The all-resident run (transformers' own experts module)."""
    return offload.generate(PROMPT, DecodeConfig(max_new_tokens=16, trace=False), None).run()


def hf_greedy(engine: Engine, text: str, n: int) -> list[int]:
    ids = torch.tensor([engine.encode(text, DecodeConfig(max_new_tokens=n))])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_reference_equals_transformers_generate(offload, reference):
    assert reference.token_ids == hf_greedy(offload.engine, PROMPT, 16)[:len(reference.tokens)]
    assert len(reference.routes) == len(reference.tokens)
    assert all(len(layer) >= 2 for step in reference.routes for layer in step)


@pytest.mark.parametrize("reads", ["thread", "compute"])
@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("policy", ["lru", "lfu", "predicted", "ahead"])
def test_every_predictor_and_policy_gives_the_reference_output(offload, reference, predictor,
                                                               policy, reads):
    cfg = OffloadConfig(capacity=3, bandwidth=FAST, predictor=predictor, lookahead=2,
                        margin=1, policy=policy, warm=False, reads=reads)
    run = offload.generate(PROMPT, DecodeConfig(max_new_tokens=16, trace=False), cfg,
                           reference.routes).run()
    assert run.token_ids == reference.token_ids
    assert run.routes == reference.routes  # prediction changes timing, never routing
    loads = [e for e in run.events if e.kind == "load"]
    assert loads, "a cold tier of 3 experts must load"
    assert all(e.end_ms >= e.start_ms for e in run.events)
    if predictor == "none":
        assert not [e for e in run.events if e.kind == "prefetch"]
    summary = run.summary()
    assert 0.0 <= summary["hit_rate"] <= 1.0
    if predictor == "oracle":
        assert all(r == 1.0 for r in summary["recall_by_distance"].values())


def test_sampling_is_identical_too(offload):
    cfg = DecodeConfig(max_new_tokens=12, trace=False,
                       sampling=SamplingConfig(temperature=0.9, top_p=0.9, seed=7))
    plain = offload.generate(PROMPT, cfg, None).run()
    run = offload.generate(PROMPT, cfg, OffloadConfig(capacity=2, bandwidth=FAST,
                                                      predictor="pregate")).run()
    assert run.token_ids == plain.token_ids


def test_the_fast_tier_never_holds_more_than_its_capacity(offload, reference):
    cap = 3
    run = offload.generate(PROMPT, DecodeConfig(max_new_tokens=10, trace=False),
                           OffloadConfig(capacity=cap, bandwidth=FAST, predictor="oracle",
                                         warm=False), reference.routes).run()
    assert 0 < run.peak_occupancy <= cap
    kinds = {e.kind for e in run.events}
    assert {"load", "prefetch", "evict", "compute"} <= kinds


def test_loads_take_the_modelled_time(offload):
    slow = Bandwidth("test", 50e6, 2e-3, "test")
    cache = ExpertCache(offload.store, 4, slow, "lru", 2)
    try:
        cache.request(0, [0, 1])
        cache.acquire(0, 0)
        cache.acquire(0, 1)
    finally:
        cache.close()
    loads = [e for e in cache.events if e.kind == "load"]
    modelled = slow.seconds(offload.store.expert_bytes) * 1000.0
    assert len(loads) == 2
    assert all(e.end_ms - e.start_ms >= modelled * 0.99 for e in loads)
    stalls = [e for e in cache.events if e.kind == "stall"]
    assert stalls and sum(e.end_ms - e.start_ms for e in stalls) >= modelled


def test_lru_evicts_the_least_recently_used(offload):
    cache = ExpertCache(offload.store, 2, PRESETS[FAST], "lru", 2)
    try:
        for layer, expert in ((0, 0), (0, 1), (0, 0), (1, 2)):
            cache.request(layer, [expert])
            cache.acquire(layer, expert)
        assert set(cache.resident()) == {(0, 0), (1, 2)}
    finally:
        cache.close()


def test_predicted_policy_keeps_what_is_predicted(offload):
    cache = ExpertCache(offload.store, 2, PRESETS[FAST], "predicted", 1)
    try:
        cache.request(0, [0])
        cache.acquire(0, 0)
        cache.request(0, [1])
        cache.acquire(0, 1)
        cache.layer = 0
        cache.predicted[(0, 0)] = cache.token  # (0, 0) is now expected again, (0, 1) is not
        cache.layer = -1
        cache.request(1, [3])
        cache.acquire(1, 3)
        assert (0, 0) in cache.resident() and (0, 1) not in cache.resident()
    finally:
        cache.close()


def fill(cache: ExpertCache, experts: list[tuple[int, int]]) -> None:
    """Load experts on demand, one after the other, and let go of them."""
    for layer, expert in experts:
        cache.layer = layer
        cache.request(layer, [expert])
        cache.acquire(layer, expert)
        cache.release(layer, expert)


def test_ahead_policy_evicts_the_expert_needed_last(offload):
    """With layers as the clock, at layer 2 of a 4-layer model: layer 3 comes next (kept), then
    layers 0, 1 and 2 of the next token; LRU would evict layer 3's expert, the oldest."""
    cache = ExpertCache(offload.store, 4, PRESETS[FAST], "ahead", 1)
    try:
        fill(cache, [(3, 0), (0, 0), (1, 0), (2, 0)])
        assert [cache.next_use(k) for k in [(3, 0), (0, 0), (1, 0), (2, 0)]] == [1, 2, 3, 4]
        fill(cache, [(2, 1)])  # the current layer's other expert is needed last: it leaves
        assert set(cache.resident()) == {(3, 0), (0, 0), (1, 0), (2, 1)}
    finally:
        cache.close()


def test_ahead_policy_uses_the_predictions(offload):
    """Once layer 3 is predicted without expert 0, (3, 0) is next needed a token later and goes
    first; a prefetch evicts only an expert expected after the one it loads."""
    cache = ExpertCache(offload.store, 3, PRESETS[FAST], "ahead", 1)
    try:
        fill(cache, [(3, 0), (0, 0), (1, 0)])
        cache.layer = 1
        assert cache.next_use((3, 0)) == 2
        cache.prefetch(3, [2], distance=2)  # (3, 0) is not predicted: it is evicted for (3, 2)
        assert (3, 0) not in cache.slots and (3, 2) in cache.slots
        assert cache.next_use((3, 2)) == 2
        cache.acquire(3, 2)
        cache.release(3, 2)
        # at layer 1, (1, 0) is next used in 4 layers and (0, 0) in 3: prefetching for layer 3
        # (in 2 layers) may evict (1, 0) but nothing expected before layer 3
        cache.prefetch(3, [2, 1], distance=2)
        assert (1, 0) not in cache.slots and (3, 1) in cache.slots
        cache.acquire(3, 1)
        cache.release(3, 1)
        cache.prefetch(3, [2, 1, 3], distance=2)  # (0, 0), needed in 3 layers, makes room
        assert (0, 0) not in cache.slots and (3, 3) in cache.slots
        cache.acquire(3, 3)
        cache.release(3, 3)
        cache.prefetch(3, [2, 1, 3, 0], distance=2)  # all resident are needed as soon: skipped
        assert (3, 0) not in cache.slots
        assert [e.kind for e in cache.events].count("evict") == 3
    finally:
        cache.close()


def test_loads_take_their_modelled_time_one_after_the_other(offload):
    """The storage channel is a clock: each load lasts bw.seconds(bytes), loads do not overlap,
    and compute that needs an expert waits (a stall) until its load has ended."""
    slow = Bandwidth("slow", 1e9, 0.04, "slow")  # 40 ms per load, whatever the size
    cache = ExpertCache(offload.store, 4, slow, "lru", 2)
    try:
        start = cache.now_ms()
        cache.request(1, [0, 1])
        cache.acquire(1, 1)  # queued second: ready after two loads
        waited = cache.now_ms() - start
        cache.acquire(1, 0)
        loads = sorted((e.start_ms, e.end_ms) for e in cache.events if e.kind == "load")
        assert len(loads) == 2
        assert all(end - begin >= 40.0 for begin, end in loads)
        assert loads[1][0] >= loads[0][1]  # one channel: the second starts when the first ends
        assert waited >= 80.0
        stalls = [e for e in cache.events if e.kind == "stall"]
        assert [(e.layer, e.expert) for e in stalls] == [(1, 1)]
        assert {(1, 0), (1, 1)} == set(cache.resident())
    finally:
        cache.close()


def test_a_newer_prediction_cancels_a_stale_queued_prefetch(offload):
    slow = Bandwidth("slow", 1e6, 0.05, "slow")  # every load takes about 100 ms
    cache = ExpertCache(offload.store, 4, slow, "predicted", 2)
    try:
        cache.prefetch(2, [0, 1], distance=2)  # (2, 0) starts loading, (2, 1) waits its turn
        cache.prefetch(2, [0, 3], distance=1)  # closer, so better: (2, 1) is no longer wanted
        cancelled = [(e.layer, e.expert) for e in cache.events if e.kind == "cancel"]
        assert cancelled == [(2, 1)]
        assert (2, 1) not in cache.slots and {(2, 0), (2, 3)} <= set(cache.slots)
        cache.request(2, [3])  # needed now: a queued prefetch jumps to the demand queue
        cache.acquire(2, 3)
        loads = [(e.layer, e.expert) for e in cache.events if e.kind == "load"]
        assert (2, 1) not in loads and (2, 3) in loads
    finally:
        cache.close()


@pytest.mark.parametrize("queue, order", [
    ("deadline", [(1, 0), (3, 1), (3, 2)]),  # the next layer's prefetch goes ahead of layer 3's
    ("fifo", [(3, 1), (3, 2), (1, 0)]),      # in the order predicted
])
def test_prefetches_wait_by_deadline_or_in_order(offload, queue, order):
    slow = Bandwidth("slow", 1e9, 0.05, "slow")  # 50 ms per load: everything after (3, 0) waits
    cache = ExpertCache(offload.store, 4, slow, "predicted", 2, queue=queue)
    try:
        cache.layer = 0
        cache.prefetch(3, [0, 1], distance=3)  # (3, 0) starts at once, (3, 1) waits
        cache.prefetch(3, [0, 1, 2], distance=3)
        cache.prefetch(1, [0], distance=1)  # needed two layers before the rest
        assert cache.channel.queue[1:] == order
    finally:
        cache.close()


def test_a_margin_waits_behind_every_top_k_guess(offload):
    """Under `deadline` a margin's extra guess (beyond the top-k) queues after the top-k guesses
    of later layers; a newer prediction that re-ranks a queued guess moves it."""
    slow = Bandwidth("slow", 1e9, 0.05, "slow")
    cache = ExpertCache(offload.store, 6, slow, "predicted", 1)  # top-1: a second is a margin
    try:
        cache.layer = 0
        cache.prefetch(1, [0, 1], distance=1)  # (1, 0) loading, (1, 1) is the margin
        cache.prefetch(2, [2, 3], distance=2)
        assert cache.channel.queue == [(1, 0), (2, 2), (1, 1), (2, 3)]
        cache.prefetch(2, [3, 2], distance=2)  # (2, 3) is now the top guess, (2, 2) a margin
        assert cache.channel.queue == [(1, 0), (2, 3), (1, 1), (2, 2)]
    finally:
        cache.close()


def test_a_layer_drops_its_wrong_queued_prefetches_when_it_computes(offload):
    """Under the deadline order a queued prediction the layer did not use is cancelled when the
    layer asks for its experts (it would take the channel for nothing this token)."""
    slow = Bandwidth("slow", 1e9, 0.05, "slow")
    for queue, dropped in (("deadline", [(2, 1)]), ("fifo", [])):
        cache = ExpertCache(offload.store, 4, slow, "predicted", 2, queue=queue)
        try:
            cache.layer = 1
            cache.prefetch(2, [0, 1], distance=1)  # (2, 0) loading, (2, 1) queued
            cache.layer = 2
            cache.request(2, [0, 3])  # (2, 1) was a wrong guess
            assert [(e.layer, e.expert) for e in cache.events if e.kind == "cancel"] == dropped
            assert ((2, 1) in cache.slots) == (queue == "fifo")
        finally:
            cache.close()


@pytest.mark.parametrize("field, value, needle", [
    ("capacity", 1, "the minimum capacity is 2"),
    ("capacity", 17, "the most is 16"),
    ("bandwidth", "floppy", "Unknown bandwidth preset"),
    ("predictor", "crystal-ball", "Unknown predictor"),
    ("policy", "random", "Unknown eviction policy"),
    ("lookahead", 0, "Lookahead 0 is out of range"),
    ("margin", 5, "Margin 5 is out of range"),
    ("queue", "lifo", "Unknown prefetch queue order 'lifo'"),
    ("margin_gap", -0.1, "Margin gap -0.1 is out of range"),
    ("reads", "telepathy", "Unknown reads 'telepathy'"),
    ("margin_gap", float("nan"), "Margin gap nan is out of range"),
])
def test_bad_settings_are_refused(offload, field, value, needle):
    cfg = dataclasses.replace(OffloadConfig(capacity=4), **{field: value})
    with pytest.raises(ConfigError, match=needle):
        offload.generate(PROMPT, DecodeConfig(max_new_tokens=4, trace=False), cfg)


def test_a_dense_model_is_refused(tiny_engine):
    with pytest.raises(UnsupportedModel, match="needs a Mixture-of-Experts model"):
        OffloadEngine(tiny_engine)


def test_the_oracle_needs_a_reference(offload):
    with pytest.raises(ConfigError, match="reference run"):
        offload.generate(PROMPT, DecodeConfig(max_new_tokens=4, trace=False),
                         OffloadConfig(capacity=4, predictor="oracle")).run()


def test_m2r2_needs_an_accelerator(offload):
    accel, offload.accel = offload.accel, None
    try:
        with pytest.raises(ConfigError, match="accelerator"):
            offload.generate(PROMPT, DecodeConfig(max_new_tokens=4, trace=False),
                             OffloadConfig(capacity=4, predictor="m2r2")).run()
    finally:
        offload.accel = accel


@pytest.mark.parametrize("reads", ["thread", "compute"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_expert_file_is_named_and_nothing_half_loads(offload, tmp_path, reference,
                                                           damage, reads):
    store = tmp_path / "store"
    shutil.copytree(offload.store.folder, store)
    broken = ExpertStore(store).path(1, reference.routes[0][1][0])
    if damage == "missing":
        broken.unlink()
    else:
        broken.write_bytes(broken.read_bytes()[:100] + b"garbage")
    original = offload.store
    offload.store = ExpertStore(store)
    try:
        with pytest.raises(AssetMissing, match=broken.name):
            offload.generate(PROMPT, DecodeConfig(max_new_tokens=4, trace=False),
                             OffloadConfig(capacity=2, bandwidth=FAST, predictor="none",
                                           warm=False, reads=reads)).run()
        with pytest.raises(AssetMissing, match=broken.name):
            ExpertStore(store).check()
    finally:
        offload.store = original
    layers = offload.engine.parts.layers  # the failed run left the shared model as it was
    assert not any(isinstance(getattr(layer.mlp, "experts", None), OffloadedExperts)
               for layer in layers)
    again = offload.generate(PROMPT, DecodeConfig(max_new_tokens=16, trace=False), None).run()
    assert again.token_ids == reference.token_ids


def test_a_missing_store_manifest_is_refused(tmp_path):
    with pytest.raises(AssetMissing, match="No expert store"):
        ExpertStore(tmp_path)


def test_recall_by_distance_counts_hits():
    routes = [[(0, 1), (2, 3), (0, 3)]]
    predictions = [(0, 0, 1, [2, 0]), (0, 0, 2, [0, 3]), (0, 1, 2, [1, 2])]
    recall = recall_by_distance(predictions, routes, 2)
    assert recall[2] == 1.0
    assert recall[1] == pytest.approx((1 + 0) / 4)


@pytest.mark.parametrize("accelerated", [False, True, "per-distance"])
def test_folded_router_predictions_equal_the_unfolded_ones(offload, accelerated):
    """The predictor folds norm gain, accelerator and routers into one matrix per layer: the
    top-k it picks must be the one the norm → accelerator → router path picks."""
    from m2r2core.moe.prefetch import RouterPredictor

    moe = offload.moe
    for layer in range(moe.n_layers):  # non-trivial gains, so folding them in is tested
        moe.norms[layer].weight.data = torch.linspace(0.5, 1.5, 64)
    accel = offload.accel if accelerated else None
    if accelerated == "per-distance":  # a different map per distance, predictions differ too
        accel = RouteAccelerator(4, 64, 4, distances=2)
        accel.b.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        accel.requires_grad_(False)
    predictor = RouterPredictor(moe, 3, 1, accel)
    generator = torch.Generator().manual_seed(1)
    try:
        for layer in range(moe.n_layers - 1):
            for _ in range(20):
                state = torch.randn(64, generator=generator) * 3
                fast = predictor.predict(0, layer, state)  # the folded matrix, in NumPy
                host, predictor._host[layer] = predictor._host[layer], None
                folded = predictor.predict(0, layer, state)  # the folded matrix, in torch
                predictor._maps[layer], kept = None, predictor._maps[layer]
                slow = predictor.predict(0, layer, state)  # norm, accelerator, routers
                predictor._maps[layer], predictor._host[layer] = kept, host
                assert host is not None
                assert fast == folded == slow and set(fast) == set(predictor.targets(layer))
    finally:
        for layer in range(moe.n_layers):
            moe.norms[layer].weight.data.fill_(1.0)


@pytest.mark.parametrize("accelerated", [False, True])
def test_a_margin_gap_names_an_extra_expert_only_where_the_router_hesitates(offload,
                                                                           accelerated):
    """With a margin gap, an expert beyond the top-k is named only when its router logit is
    within gap standard deviations (of that prediction's logits) of the k-th one's: computed
    here from the routers directly. No gap names every margin expert, a huge gap too, gap 0
    only the top-k (and exact ties)."""
    from m2r2core.moe.prefetch import RouterPredictor

    moe = offload.moe
    accel = offload.accel if accelerated else None
    k, margin = moe.top_k, 2
    gated = {gap: RouterPredictor(moe, 2, margin, accel, margin_gap=gap)
             for gap in (None, 0.0, 0.5, 1e9)}
    generator = torch.Generator().manual_seed(4)
    named = {gap: 0 for gap in gated}
    for layer in range(moe.n_layers - 1):
        for _ in range(30):
            state = torch.randn(64, generator=generator) * 3
            every = gated[None].predict(0, layer, state)
            assert every == gated[1e9].predict(0, layer, state)
            for gap, predictor in gated.items():
                got = predictor.predict(0, layer, state)
                named[gap] += sum(len(v) for v in got.values())
                for target, experts in got.items():
                    x = state if accel is None else accel(layer, state, target - layer)
                    logits = moe.logits(target, x)
                    top = logits.topk(k + margin)
                    want = top.indices.tolist()
                    if gap is not None:
                        cut = top.values[k - 1] - gap * logits.std()
                        want = [e for e, v in zip(want, top.values.tolist(), strict=True)
                                if v >= cut - 1e-6]
                    assert experts == want
                    assert experts[:k] == every[target][:k]  # the top-k is never gated
    assert named[0.0] < named[0.5] < named[None] == named[1e9]


def test_a_per_distance_accelerator_trains_each_distance_and_round_trips(offload, tmp_path):
    from m2r2core.moe import prefetch

    moe = offload.moe
    gen = torch.Generator().manual_seed(3)
    states = [torch.randn(64, 64, generator=gen) for _ in range(moe.n_layers)]
    used = [torch.randint(0, moe.n_experts, (64, moe.top_k), generator=gen)
            if moe.is_moe(i) else None for i in range(moe.n_layers)]
    accel = prefetch.fit_accelerator(moe, states, used, rank=4, lookahead=2, steps=5, seed=0,
                                     validation=0)
    assert accel.distances == 2 and accel.a.shape == (moe.n_layers, 2, 4, 64)
    assert not torch.equal(accel.b[0, 0], accel.b[0, 1])  # each distance its own map
    card = prefetch.AccelCard("fp", 4, 2, 64, 5, {})
    prefetch.save_route_accelerator(accel, card, tmp_path)
    back, _ = prefetch.load_route_accelerator(tmp_path, "fp")
    assert back.distances == 2 and torch.equal(back.b, accel.b)
    state = torch.randn(64, generator=gen)
    assert torch.equal(back(0, state, 5), back(0, state, 2))  # beyond D: the furthest map
    shared = prefetch.fit_accelerator(moe, states, used, 4, 2, 5, 0, per_distance=False)
    assert shared.distances == 0 and shared.a.shape == (moe.n_layers, 4, 64)
    # where the plain state already routes every held-out token right, no map is kept
    plain = [moe.logits(i, states[i - 1]).topk(moe.top_k, -1).indices if i and moe.is_moe(i)
             else None for i in range(moe.n_layers)]
    gated = prefetch.fit_accelerator(moe, states, plain, 4, 2, 20, 0)
    assert all(not gated.b[layer, 0].any() for layer in range(moe.n_layers - 1)
               if moe.is_moe(layer + 1))


def test_the_rank_objective_asks_for_the_used_experts_as_the_top_k():
    """Plackett-Luce: lowest when the used experts lead in the gate's order, and a set that is
    only in the top k+1 costs more than under the set objective's uniform target."""
    from m2r2core.moe.prefetch import _route_loss

    used = torch.tensor([[0, 1]])
    right = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    swapped = torch.tensor([[4.0, 5.0, 0.0, 0.0]])
    third = torch.tensor([[5.0, 0.0, 4.0, 0.0]])  # expert 1 ranks below expert 2
    assert _route_loss(right, used, 4, "rank") < _route_loss(swapped, used, 4, "rank")
    assert _route_loss(right, used, 4, "rank") < _route_loss(third, used, 4, "rank")
    # hand-computed: -log p(0) - log p(1 | not 0)
    p0 = torch.log_softmax(right, -1)[0, 0]
    p1 = torch.log_softmax(right[:, 1:], -1)[0, 0]
    assert torch.isclose(_route_loss(right, used, 4, "rank"), -(p0 + p1))
    goal = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert torch.isclose(_route_loss(right, used, 4, "set"),
                         -(goal * torch.log_softmax(right, -1)).sum())


def test_minibatch_fits_learn_the_routes_and_bad_losses_are_refused(offload):
    """A minibatch fit with either objective learns a route the plain state misses (a fixed
    linear function of the state), and an unknown objective is refused by name."""
    from m2r2core.moe import prefetch

    moe = offload.moe
    gen = torch.Generator().manual_seed(5)
    states = [torch.randn(400, 64, generator=gen).to(torch.bfloat16) for _ in range(moe.n_layers)]
    mix = torch.randn(64, 64, generator=gen)
    used = [moe.logits(i, states[i - 1].float() @ mix).topk(moe.top_k, -1).indices
            if i and moe.is_moe(i) else None for i in range(moe.n_layers)]
    held = torch.arange(400) % 10 == 0
    for loss in prefetch.ACCEL_LOSSES:
        accel = prefetch.fit_accelerator(moe, states, used, rank=8, lookahead=1, steps=150,
                                         seed=0, batch_tokens=64, lr=1e-2, loss=loss)
        layer = next(i for i in range(moe.n_layers - 1) if moe.is_moe(i + 1))
        x = states[layer][held].float()

        def recall(state, target=layer + 1):
            picked = moe.logits(target, state).topk(moe.top_k, -1).indices
            return (picked[:, :, None] == used[target][held][:, None, :]).any(-1).float().mean()

        assert accel.b[layer, 0].any(), loss  # kept: it beat the plain state on held tokens
        assert recall(accel(layer, x, 1)) > recall(x) + 0.1, loss
    with pytest.raises(ConfigError, match="Unknown accelerator loss 'hinge'"):
        prefetch.fit_accelerator(moe, states, used, 4, 1, 1, 0, loss="hinge")


def test_fit_accel_keeps_its_states_in_the_cache_and_rereads_them(tmp_path, monkeypatch):
    """--states-cache: the second call with the same settings reads the file instead of the
    model; other settings, another MoE's files (a distillation of the same MoEfication: the
    model fingerprint, the base model's, cannot tell them apart), or a corrupt file, read
    again."""
    import argparse

    from m2r2core.moe import distilled as distilled_mod
    from m2r2core.moe import moefy
    from m2r2core.train import moe_accel

    monkeypatch.setattr("m2r2core.train.common.default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr("m2r2core.runtime.model.fingerprint", lambda model: "fp")
    trained = tmp_path / "moe"
    trained.mkdir()
    (trained / moefy.WEIGHTS).write_bytes(b"moefication")
    (trained / distilled_mod.CARD).write_text("{}")
    (trained / distilled_mod.WEIGHTS).write_bytes(b"distillation 1")
    args = argparse.Namespace(states_cache=True, tokens=100, answers=0, answer_tokens=8,
                              corpus_answers=0, seed=0, trained=str(trained))
    calls = []

    def read():
        calls.append(1)
        return [torch.ones(3, 2)], [None]

    first = moe_accel._cached(args, None, "train", read)
    again = moe_accel._cached(args, None, "train", read)
    assert len(calls) == 1 and torch.equal(first[0][0], again[0][0])
    (trained / distilled_mod.WEIGHTS).write_bytes(b"distillation 2")
    moe_accel._cached(args, None, "train", read)
    assert len(calls) == 2
    args.tokens = 200
    moe_accel._cached(args, None, "train", read)
    assert len(calls) == 3
    for path in tmp_path.rglob("accel-states-*.pt"):
        path.write_bytes(b"not a torch file")
    moe_accel._cached(args, None, "train", read)
    assert len(calls) == 4
    args.states_cache = False
    moe_accel._cached(args, None, "train", read)
    assert len(calls) == 5 and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("gap", [None, 0.0, 0.4])
def test_held_out_recall_gates_a_margin_as_the_predictor_does(offload, gap):
    """fit-accel's held-out recall with --margin-gap counts the experts the runtime predictor
    would name, token by token, and the price (experts beyond the top-k per layer)."""
    from m2r2core.moe.prefetch import RouterPredictor
    from m2r2core.train import moe_accel

    moe, n_tokens, distance, margin = offload.moe, 40, 1, 2
    generator = torch.Generator().manual_seed(5)
    states = [torch.randn(n_tokens, 64, generator=generator) * 3 for _ in range(moe.n_layers)]
    used = [torch.stack([torch.randperm(moe.n_experts, generator=generator)[:moe.top_k]
                         for _ in range(n_tokens)]) if moe.is_moe(t) else None
            for t in range(moe.n_layers)]
    recall, extra = moe_accel._state_recall(moe, states, used, None, distance,
                                            moe.top_k + margin, gap)
    predictor = RouterPredictor(moe, distance, margin, margin_gap=gap)
    hits = total = named = rows = 0
    for layer in range(moe.n_layers - distance):
        target = layer + distance
        if not moe.is_moe(target):
            continue
        for token in range(n_tokens):
            experts = predictor.predict(0, layer, states[layer][token])[target]
            hits += len(set(experts) & set(used[target][token].tolist()))
            total += moe.top_k
            named += len(experts) - moe.top_k
            rows += 1
    assert recall == pytest.approx(hits / total)
    assert extra == pytest.approx(named / rows)
    assert (extra == margin) == (gap is None)


@pytest.mark.parametrize("reads", ["thread", "compute"])
def test_loads_read_into_the_tiers_fixed_buffers(offload, reference, reads):
    """Every load lands in one of the tier's preallocated buffers: no memory is allocated per
    load, and a reused buffer holds exactly the new expert's bytes."""
    cache = ExpertCache(offload.store, 2, PRESETS[FAST], "lru", 2, reads=reads)
    pointers = {b.data_ptr() for b in cache.reader.buffers}
    try:
        for layer in range(4):
            for expert in range(4):
                cache.request(layer, [expert])
                weights = cache.acquire(layer, expert)
                assert weights["down_proj"].data_ptr() in pointers
                original = offload.engine.parts.layers[layer].mlp.experts  # the model keeps its own
                assert torch.equal(weights["down_proj"], original.down_proj[expert])
                assert torch.equal(weights["gate_up_proj"], original.gate_up_proj[expert])
                cache.release(layer, expert)
    finally:
        cache.close()


def test_compute_reads_read_only_the_experts_used(offload, monkeypatch):
    """`compute` reads: a prefetched guess is resident on the channel's clock but its bytes are
    read only when a layer uses it, in the compute thread; a guess never used is never read
    and may still be evicted; `thread` reads every load as it is queued."""
    read = []
    for reads in ("compute", "thread"):
        cache = ExpertCache(offload.store, 3, PRESETS[FAST], "lru", 2, reads=reads)
        real = cache.reader.fill
        monkeypatch.setattr(cache.reader, "fill", lambda key, index, real=real, reads=reads: (
            read.append((reads, key, threading.current_thread().name)) or real(key, index)))
        try:
            cache.prefetch(1, [0, 1, 2], distance=1)  # three guesses, one will be used
            cache.token, cache.layer = 0, 1
            cache.request(1, [1])
            weights = cache.acquire(1, 1)
            assert torch.equal(weights["down_proj"],
                               offload.engine.parts.layers[1].mlp.experts.down_proj[1])
            cache.release(1, 1)
            time.sleep(0.05)
            cache.token, cache.layer = 1, 0
            cache.request(2, [3])  # the tier is full of resident guesses: an unread one leaves
            cache.acquire(2, 3)
            cache.release(2, 3)
        finally:
            cache.close()
    computed = [(key, thread) for mode, key, thread in read if mode == "compute"]
    assert computed == [((1, 1), "MainThread"), ((2, 3), "MainThread")]
    threaded = {key for mode, key, thread in read if mode == "thread"}
    assert threaded == {(1, 0), (1, 1), (1, 2), (2, 3)}
    assert all(thread == "expert-loader" for mode, _, thread in read if mode == "thread")


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory, real_model_dir) -> Path:
    """A tiny Qwen2-MoE like the MoEfied SmolLM2: layer 0 dense, a gated shared expert."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from tests.conftest import TOKENIZER_FILES

    config = Qwen2MoeConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, qkv_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for layer in model.model.layers[1:]:  # the zero-initialised router would tie every expert
        layer.mlp.gate.weight.data.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("tiny-qwen2-moe")
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real_model_dir / name).exists():
            shutil.copy(real_model_dir / name, folder / name)
    return folder


def test_qwen2_moe_with_a_dense_layer_and_a_shared_expert(tiny_qwen2_moe, tmp_path):
    engine = Engine.load(EngineConfig(model=str(tiny_qwen2_moe), dtype="float32"))
    expected = hf_greedy(engine, PROMPT, 12)
    moe = OffloadEngine(engine, store=tmp_path / "store")
    assert moe.total_experts == 3 * 4  # layer 0 is dense: its MLP never leaves memory
    assert not moe.moe.is_moe(0)
    for predictor in ("pregate", "previous", "none"):
        run = moe.generate(PROMPT, DecodeConfig(max_new_tokens=12, trace=False),
                           OffloadConfig(capacity=2, bandwidth=FAST, predictor=predictor,
                                         warm=False)).run()
        assert run.token_ids == expected[:len(run.token_ids)]
        assert all(step[0] == () for step in run.routes)  # the dense layer routes nothing
        assert {e.layer for e in run.events if e.kind == "load"} <= {1, 2, 3}


def test_benchmark_cli_in_process(offload, tmp_path):
    import json

    from analysis import moe_bench

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    args = moe_bench.parse_args([
        "--prompts", str(prompts), "--max-new-tokens", "5", "--repeats", "1", "--capacity",
        "4", "--bandwidth", "nvme", "--predictors", "none", "pregate", "oracle", "--policies",
        "lru", "predicted", "ahead", "--lookahead", "1", "2", "--sweep-capacity", "2", "8",
        "--sweep-bandwidth", "emmc", "--dtype", "float32", "--margin", "0", "1",
        "--queues", "deadline", "fifo", "--margin-gap", "0.3"])
    report = moe_bench.bench(args, offload=offload)
    summary = report["summary"]
    base = summary["none/lru/D1/cap4/nvme"]
    assert base["speedup_vs_ondemand_lru"] == 1.0
    assert "oracle/predicted/D2/cap4/nvme" in summary
    assert "pregate/predicted/D1/cap8/nvme" in summary and "none/lru/D1/cap2/nvme" in summary
    assert "pregate/predicted/D1/cap4/emmc" in summary
    # on-demand loading gets the policies that differ without predictions, `predicted` does not
    assert "none/ahead/D1/cap4/nvme" in summary and "none/predicted/D1/cap4/nvme" not in summary
    assert "oracle/ahead/D2/cap4/nvme" in summary
    # margins and prefetch orders: every predictor but the oracle at each, named in the key
    assert {"pregate/predicted/D2/cap4/nvme/m1", "pregate/predicted/D2/cap4/nvme/fifo",
            "pregate/predicted/D2/cap4/nvme/m1/fifo"} <= set(summary)
    assert "oracle/predicted/D2/cap4/nvme/m1" not in summary
    # a margin gap: beside the ungated margin, for router predictors only
    gated = summary["pregate/predicted/D2/cap4/nvme/m1g0.3"]
    assert gated["margin"] == 1 and gated["margin_gap"] == 0.3
    assert summary["pregate/predicted/D2/cap4/nvme/m1"]["margin_gap"] is None
    assert not [k for k in summary if "g0.3" in k and not k.startswith("pregate/")]
    assert summary["pregate/predicted/D2/cap4/nvme/m1/fifo"]["margin"] == 1
    assert summary["pregate/predicted/D2/cap4/nvme/m1/fifo"]["queue"] == "fifo"
    for key, row in summary.items():
        if key == "resident_tok_per_s":
            continue
        assert row["identical"] == row["prompts"] == 1, key
        assert row["speedup_vs_ondemand_lru"] > 0 and 0 <= row["hit_rate"] <= 1
    assert summary["oracle/predicted/D2/cap4/nvme"]["recall_by_distance"] == {"1": 1.0,
                                                                              "2": 1.0}
    # every setting sits beside its ceiling and the oracle at its capacity and storage
    oracle = summary["oracle/predicted/D2/cap4/nvme"]
    assert oracle["oracle_speedup"] == oracle["speedup_vs_ondemand_lru"]
    pregate = summary["pregate/predicted/D2/cap4/nvme"]
    assert pregate["oracle_speedup"] == oracle["speedup_vs_ondemand_lru"]
    if oracle["speedup_vs_ondemand_lru"] > 1:
        assert pregate["share_of_oracle_gain"] == pytest.approx(
            (pregate["speedup_vs_ondemand_lru"] - 1) / (oracle["speedup_vs_ondemand_lru"] - 1),
            abs=1e-3)
    assert summary["pregate/predicted/D1/cap8/nvme"]["oracle_speedup"] is None  # none ran there
    assert all(r["ceiling"] > 0 for k, r in summary.items() if k != "resident_tok_per_s")


def test_benchmark_grid_runs_whole_under_each_reads():
    """--reads thread compute: every setting, baselines and oracle included, once under each,
    keyed apart, each against the on-demand baseline of its own reads."""
    from analysis import moe_bench

    args = moe_bench.parse_args(["--predictors", "none", "m2r2", "oracle", "--policies",
                                 "predicted", "--sweep-capacity", "38", "--reads", "thread",
                                 "compute"])
    grid = moe_bench.settings(args)
    thread = [s for s in grid if s.reads == "thread"]
    compute = [s for s in grid if s.reads == "compute"]
    assert len(thread) == len(compute) == len(grid) // 2
    assert [dataclasses.replace(s, reads="thread") for s in compute] == thread
    labels = [moe_bench.label(s) for s in grid]
    assert len(set(labels)) == len(labels)
    assert "m2r2/predicted/D2/cap77/ufs/compute" in labels
    for s in compute:
        assert moe_bench._baseline(s, args).reads == "compute"


def test_an_abandoned_run_blocks_no_other_run_and_leaves_the_model_alone(offload, reference):
    """A consumer that stops reading mid-run (a browser session that went away) holds no lock:
    a second run in another thread finishes with the reference output; between forward passes
    the shared model has its own expert modules, never a run's."""
    import threading

    cfg = OffloadConfig(capacity=3, bandwidth=FAST, predictor="m2r2", lookahead=2, warm=False)
    abandoned = iter(offload.generate(PROMPT, DecodeConfig(max_new_tokens=16, trace=False), cfg))
    next(abandoned), next(abandoned)  # two tokens, then the reader goes away (never closed)
    layers = offload.engine.parts.layers
    assert not any(isinstance(getattr(layer.mlp, "experts", None), OffloadedExperts)
                   for layer in layers)
    done = {}

    def second() -> None:
        done["run"] = offload.generate(PROMPT, DecodeConfig(max_new_tokens=16, trace=False),
                                       cfg).run()

    worker = threading.Thread(target=second, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the second run waited on the abandoned one"
    assert done["run"].token_ids == reference.token_ids
    rest = [t.token_id for t in abandoned]  # the abandoned run can still finish, unharmed
    assert rest == reference.token_ids[2:]


def test_the_moefication_files_are_checked(tmp_path):
    """The committed MoEfication loads; a missing card, a corrupt weights file, or weights that
    do not match the card are refused with ArtifactError naming the folder."""
    from m2r2core.errors import ArtifactError
    from m2r2core.moe import moefy

    card, tensors = moefy.load_trained()
    assert card.n_experts > card.top_k and tensors
    folder = tmp_path / "moe"
    shutil.copytree(moefy.TRAINED_DIR, folder)
    (folder / moefy.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="could not be loaded"):
        moefy.load_trained(folder)
    shutil.copy(moefy.TRAINED_DIR / moefy.WEIGHTS, folder / moefy.WEIGHTS)
    (folder / moefy.CARD).write_text((folder / moefy.CARD).read_text().replace(
        '"dense_layers": [', '"dense_layers": [29, '))
    with pytest.raises(ArtifactError, match="does not hold the tensors"):
        moefy.load_trained(folder)
    (folder / moefy.CARD).unlink()
    with pytest.raises(ArtifactError, match="No MoEfication card"):
        moefy.load_trained(folder)


def test_moes_that_differ_only_in_their_experts_get_their_own_stores(tiny_qwen2_moe, monkeypatch,
                                                                     tmp_path):
    """A distillation changes the experts, not the head or the shape the fingerprint reads: its
    expert store must not be the MoEfication's."""
    from m2r2core.moe.offload import store_dir

    monkeypatch.setenv("M2R2_CACHE", str(tmp_path))
    engine = Engine.load(EngineConfig(model=str(tiny_qwen2_moe), dtype="float32"))
    before = store_dir(engine)
    experts = engine.parts.layers[2].mlp.experts
    saved = experts.down_proj.data.clone()
    try:
        experts.down_proj.data[0, 0, 0] += 1.0
        assert store_dir(engine) != before
        assert engine.info.fingerprint in before.name or engine.info.fingerprint[:12] in before.name
    finally:
        experts.down_proj.data.copy_(saved)
    assert store_dir(engine) == before
