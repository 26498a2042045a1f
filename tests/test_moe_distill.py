"""The MoE distillation: the training-time MoE layer is exactly the Qwen2-MoE layer the build
writes, its losses train, and a distillation is refused for another MoEfication or base model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from m2r2core.errors import ArtifactError
from m2r2core.moe import distilled, moefy
from m2r2core.moe.moefy import MoeCard
from m2r2core.train import moe_distill


def _moefication(n_neurons: int, hidden: int, layers: int, seed: int = 0):
    """A hand-made MoEfication of a tiny model: 32 shared neurons, 4 experts of 24."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(1, layers):
        order = torch.randperm(n_neurons, generator=gen)
        tensors[f"layers.{i}.shared"] = order[:32].sort().values.to(torch.int32)
        tensors[f"layers.{i}.experts"] = order[32:].reshape(4, -1).sort(1).values.to(torch.int32)
        tensors[f"layers.{i}.router"] = torch.randn(4, hidden, generator=gen)
    card = MoeCard(base_model="tiny", n_experts=4, top_k=2, shared_size=32, dense_layers=[0],
                   refit_tokens=0, router_scale=0.5, seed=0, tokens=0, router_steps=0,
                   metrics={"router_recall_by_layer": {str(i): 0.5 for i in range(1, layers)}})
    return card, tensors


@pytest.fixture(scope="module")
def tiny_dense(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _wrapped(tiny_dense, rank: int = 4):
    import copy

    dense = copy.deepcopy(tiny_dense)
    cfg = dense.config
    card, tensors = _moefication(cfg.intermediate_size, cfg.hidden_size, cfg.num_hidden_layers)
    downs = {i: layer.mlp.down_proj.weight.float() * 0.9
             for i, layer in enumerate(dense.model.layers) if i not in card.dense_layers}
    sparse = moe_distill.wrap(dense, card, tensors, downs, rank, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial distillation: every correction and router moved
        for mlp in sparse.values():
            for p in mlp.fix.values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            mlp.router.add_(torch.randn(mlp.router.shape, generator=gen) * 0.3)
    return tiny_dense, dense, card, tensors, downs, sparse


def test_the_training_layer_is_the_built_qwen2_moe(tiny_dense):
    original, dense, card, tensors, downs, sparse = _wrapped(tiny_dense)
    fixes = {}
    for index, mlp in sparse.items():
        fixes |= mlp.tensors(index)
    built = moefy.moe_model(*moefy.moe_state(original, tensors, card, downs, fixes))
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(3))
    dense.eval()
    moe_distill.set_teacher(sparse, False)
    with torch.no_grad():
        ours, theirs = dense(ids).logits, built(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    moe_distill.set_teacher(sparse, True)  # the teacher is the untouched dense model
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, original(ids).logits, atol=1e-5)


def test_a_step_lowers_the_losses_and_touches_only_the_trainable_parts(tiny_dense):
    _, dense, _, _, _, sparse = _wrapped(tiny_dense)
    frozen = {k: v.clone() for k, v in dense.state_dict().items() if ".fix." not in k
              and not k.endswith(".router")}
    params = [p for m in sparse.values() for p in [m.router, *m.fix.values()]]
    optim = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(4))
    dense.train()
    losses = []
    for _ in range(8):
        moe_distill.set_teacher(sparse, True)
        with torch.no_grad():
            teacher = dense(ids).logits
        moe_distill.set_teacher(sparse, False)
        student = dense(ids).logits
        kl = moe_distill.kl_loss(student, teacher, torch.ones(ids.shape), top=16)
        local = torch.stack([m.losses["local"] for m in sparse.values()]).mean()
        loss = kl + local
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9
    after = dense.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_a_full_weight_student_trains_its_weights_builds_and_saves_as_deltas(tmp_path, tiny_dense):
    """--full: the projections themselves train (starting from the low-rank corrections folded
    in), the teacher stays the dense model, the built Qwen2-MoE with the deltas is the
    student, and the deltas round-trip through distilled.save/load (card rank 0)."""
    import copy

    original, _, card, tensors, downs, low_rank = _wrapped(tiny_dense)
    corrections = {}
    for index, mlp in low_rank.items():
        corrections |= mlp.tensors(index)
    dense = copy.deepcopy(original)
    sparse = moe_distill.wrap(dense, card, tensors, downs, 0, seed=0, full=True)
    for index, mlp in sparse.items():
        mlp.load(corrections, index)
        assert not list(mlp.fix.parameters()) and len(list(mlp.weights.parameters())) == 3
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(6))
    built_low = moefy.moe_model(*moefy.moe_state(original, tensors, card, downs, corrections))
    dense.eval()
    with torch.no_grad():  # the corrections, folded into full weights, are the same MoE
        assert torch.allclose(dense(ids).logits, built_low(ids).logits, atol=1e-4, rtol=1e-4)
    params = [p for m in sparse.values() for p in [m.router, *m.weights.values()]]
    optim = torch.optim.Adam(params, lr=1e-3)
    dense.train()
    first = None
    for _ in range(4):
        moe_distill.set_teacher(sparse, True)
        with torch.no_grad():
            teacher = dense(ids).logits
        moe_distill.set_teacher(sparse, False)
        loss = moe_distill.kl_loss(dense(ids).logits, teacher, torch.ones(ids.shape), top=16)
        first = loss.item() if first is None else first
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < first
    moe_distill.set_teacher(sparse, True)
    dense.eval()
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, original(ids).logits, atol=1e-5)
    deltas = {}
    for index, mlp in sparse.items():
        deltas |= mlp.tensors(index)
    assert {k.rsplit(".", 1)[-1] for k in deltas} == {"router", "delta"}
    moe_distill.set_teacher(sparse, False)
    built = moefy.moe_model(*moefy.moe_state(original, tensors, card, downs, deltas))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, built(ids).logits, atol=1e-4, rtol=1e-4)
    folder, _ = _saved(tmp_path, tiny_dense)
    distilled.save(folder, deltas, distilled.DistilledCard(
        base_model="tiny", moefy_digest=distilled.moefy_digest(folder), rank=0,
        layers=sorted(sparse), steps=4, tokens=1, data="test"))
    saved_card, loaded = distilled.load(folder, "tiny")
    assert saved_card.rank == 0 and set(loaded) == set(deltas)


def test_top_k_kl_is_the_full_kl_when_the_tail_is_empty():
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(6, 10, generator=gen)
    student = torch.randn(6, 10, generator=gen)
    full = moe_distill.kl_loss(student, teacher, torch.ones(6), top=0)
    assert torch.allclose(moe_distill.kl_loss(student, teacher, torch.ones(6), top=10), full,
                          atol=1e-5)
    assert moe_distill.kl_loss(student, teacher, torch.ones(6), top=3) <= full + 1e-6


def _saved(tmp_path, tiny_dense):
    _, _, card, tensors, _, sparse = _wrapped(tiny_dense)
    folder = tmp_path / "moe"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / moefy.WEIGHTS))
    (folder / moefy.CARD).write_text(json.dumps(asdict(card)))
    fixes = {}
    for index, mlp in sparse.items():
        fixes |= mlp.tensors(index)
    distilled.save(folder, fixes, distilled.DistilledCard(
        base_model="tiny", moefy_digest=distilled.moefy_digest(folder), rank=4,
        layers=sorted(sparse), steps=1, tokens=1, data="test"))
    return folder, fixes


def test_a_saved_distillation_loads_back(tmp_path, tiny_dense):
    folder, fixes = _saved(tmp_path, tiny_dense)
    card, loaded = distilled.load(folder, "tiny")
    assert card.rank == 4 and set(loaded) == set(fixes)
    assert torch.allclose(loaded["layers.1.router"], fixes["layers.1.router"])
    assert torch.allclose(loaded["layers.1.gate.b"], fixes["layers.1.gate.b"], atol=1e-2)


def test_another_base_model_or_moefication_or_a_damaged_file_is_refused(tmp_path, tiny_dense):
    folder, _ = _saved(tmp_path, tiny_dense)
    with pytest.raises(ArtifactError, match="'tiny'.*'smollm2"):
        distilled.load(folder, "smollm2-135m-instruct")
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights = moefy.WEIGHTS
    (other / weights).write_bytes((other / weights).read_bytes() + b" ")
    with pytest.raises(ArtifactError, match="another MoEfication"):
        distilled.load(other, "tiny")
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / distilled.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="could not be loaded"):
        distilled.load(damaged, "tiny")
    (damaged / distilled.CARD).write_text("{")
    with pytest.raises(ArtifactError, match="corrupt"):
        distilled.load(damaged, "tiny")


def _next_token_loss(seed: int):
    """model -> its next-token cross-entropy on 16 random tokens (the probes' `measure`)."""
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(seed))

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))

    return loss


def test_layer_sensitivity_gives_back_dense_layers_and_restores_the_moe(tiny_dense):
    from m2r2core.train import moe_quality

    original, _, card, tensors, downs, _ = _wrapped(tiny_dense)
    built = moefy.moe_model(*moefy.moe_state(original, tensors, card, downs))
    loss = _next_token_loss(seed=5)

    before = loss(built)
    n_moe = original.config.num_hidden_layers - 1
    report = moe_quality.layer_sensitivity(built, original, loss, max_dense=n_moe)
    assert report["moe"] == pytest.approx(before)
    assert sorted(report["order"]) == list(range(1, n_moe + 1))
    assert set(report["one_layer_dense"]) == {str(i) for i in range(1, n_moe + 1)}
    # every MoE layer made dense again is the dense model itself
    assert report["greedy"][-1]["score"] == pytest.approx(loss(original), abs=1e-5)
    assert report["greedy"][-1]["score"] != pytest.approx(before, abs=1e-3)
    assert loss(built) == pytest.approx(before)  # the MoE is left as it was


def test_routing_probe_reproduces_the_build_and_every_expert_is_the_refitted_dense_mlp(
        tiny_dense):
    """The probe's 'as built' routing is the MoE itself; every expert at weight one is the dense
    MLP with the MoEfication's refitted down projection (shared neurons and experts partition
    the neurons); the MoE is left as it was."""
    import copy

    from m2r2core.train import moe_quality

    original, _, card, tensors, downs, _ = _wrapped(tiny_dense)
    built = moefy.moe_model(*moefy.moe_state(original, tensors, card, downs))
    refitted = copy.deepcopy(original)
    for index, layer in enumerate(refitted.model.layers):
        if index not in card.dense_layers:
            layer.mlp.down_proj.weight.data = downs[index].clone()
    loss = _next_token_loss(seed=7)

    before = loss(built)
    report = moe_quality.routing_probe(built, loss)
    rows = report["rows"]
    assert report["k_built"] == card.top_k and report["experts"] == card.n_experts
    assert rows[0] == {"routing": "unpatched", "score": pytest.approx(before)}
    assert rows[1]["select"] == "router" and rows[1]["weights"] == "router"
    assert rows[1]["score"] == pytest.approx(before, abs=1e-5)
    every = next(r for r in rows[1:] if r["k"] == card.n_experts and r["weights"] == "uniform")
    assert every["score"] == pytest.approx(loss(refitted), abs=1e-5)
    assert every["score"] != pytest.approx(before, abs=1e-3)
    assert {r["select"] for r in rows[1:]} == {"router", "oracle"}
    assert loss(built) == pytest.approx(before)  # the MoE is left as it was
