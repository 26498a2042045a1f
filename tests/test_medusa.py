"""Medusa-style heads, the speculative peer: lossless against transformers, drafts read from the
right state, bad settings and bad files refused with the adapters kept."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from m2r2core.config import DecodeConfig
from m2r2core.errors import ConfigError
from m2r2core.spec.medusa import HEADS_CARD, HEADS_FILE, head_pairs
from m2r2core.spec.speculative import SpecConfig
from tests.test_speculative import PROMPT, engine_with_trained, hf_greedy


@pytest.fixture(scope="module")
def medusa_engine(tiny_trained_dir, tiny_model_dir):
    engine = engine_with_trained(tiny_trained_dir, tiny_model_dir)
    assert engine.medusa is not None and engine.medusa.n_heads == 3
    return engine


def test_training_writes_a_card_with_held_out_accuracy(tiny_trained_dir):
    card = json.loads((tiny_trained_dir / "tiny" / HEADS_CARD).read_text())
    assert card["n_heads"] == 3 and card["training"]["positions"] > 0
    accuracy = card["metrics"]["held_out_top1_by_head"]
    assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)


@pytest.mark.parametrize("spec", [
    SpecConfig(stream="medusa", max_draft=3),
    SpecConfig(stream="medusa", max_draft=2, min_confidence=0.05),
    SpecConfig(stream="medusa", max_draft=3, draft_vocab="sub"),
])
def test_medusa_drafts_are_lossless(medusa_engine, spec):
    want = hf_greedy(medusa_engine, PROMPT, 30)
    run = medusa_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=30, trace=False),
                                  spec).run()
    assert tuple(run.tokens) == want
    rounds = run.rounds[1:]
    assert rounds and all(0 <= r.accepted <= len(r.drafts) <= spec.max_draft for r in rounds)
    assert all(r.emitted[:r.accepted] == r.drafts[:r.accepted] for r in rounds)


def test_heads_read_the_state_that_chose_the_last_token(medusa_engine):
    """Each round's drafts are the heads applied to the model's final normalised state at the
    position whose logits chose the round's first input token (recomputed here in one pass)."""
    engine = medusa_engine
    cfg = DecodeConfig(max_new_tokens=20, trace=False)
    run = engine.speculate(PROMPT, cfg, SpecConfig(stream="medusa", max_draft=3)).run()
    prompt_ids = engine.encode(PROMPT, cfg)
    ids = torch.tensor([prompt_ids + list(run.tokens)])
    with torch.inference_mode():
        normed = engine.model.model(input_ids=ids).last_hidden_state[0]  # (T, H)
        guesses = engine.model.lm_head(engine.medusa(normed)).argmax(-1)  # (T, K)
    for r in run.rounds[1:]:
        if not r.drafts:
            continue
        row = len(prompt_ids) + r.position - 2  # the position that chose token r.position - 1
        assert list(r.drafts) == guesses[row, :len(r.drafts)].tolist()


def test_head_data_in_padded_batches_equals_one_sample_at_a_time(tiny_engine, monkeypatch):
    """Rows of different lengths share a batch (right padding); every sample's states, greedy
    tokens, indices and answer flags come back in the samples' order, as one at a time."""
    from types import SimpleNamespace

    from m2r2core.train import data

    gen = torch.Generator().manual_seed(0)
    samples = [SimpleNamespace(ids=torch.randint(5, 200, (n,), generator=gen).tolist(),
                               answer_start=a) for n, a in ((40, 10), (7, 2), (64, 30), (23, 5))]
    monkeypatch.setattr(data, "HEAD_BATCH_TOKENS", 128)  # several batches, each padded
    model = tiny_engine.model
    states, greedy, index, answer = data.head_data(model, samples, 48)
    assert index.tolist() == [i for s in samples for i in range(min(48, len(s.ids)))]
    with torch.no_grad():
        for s, (lo, hi) in zip(samples, _spans(index), strict=True):
            alone = model.model(input_ids=torch.tensor([s.ids[:48]])).last_hidden_state[0]
            torch.testing.assert_close(states[lo:hi], alone, atol=1e-5, rtol=1e-4)
            assert greedy[lo:hi].tolist() == model.lm_head(alone).argmax(-1).tolist()
            assert answer[lo:hi].tolist() == [i >= s.answer_start - 1 for i in range(hi - lo)]


def _spans(index: torch.Tensor) -> list[tuple[int, int]]:
    starts = (index == 0).nonzero().flatten().tolist() + [len(index)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def test_head_pairs_stay_inside_a_row_and_the_answers():
    greedy = torch.tensor([10, 11, 12, 13, 20, 21, 22])
    index = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    everywhere = torch.ones(7, dtype=torch.bool)
    t, labels = head_pairs(greedy, index, everywhere, 2)
    assert t.tolist() == [0, 1, 4] and labels.tolist() == [12, 13, 22]
    answers_only = torch.tensor([False, True, True, True, True, True, True])
    t, labels = head_pairs(greedy, index, answers_only, 2)
    assert t.tolist() == [1, 4] and labels.tolist() == [13, 22]


@pytest.mark.parametrize("bad, match", [
    (SpecConfig(stream="medusa", max_draft=4), "max_draft"),
    (SpecConfig(stream="medusa", max_draft=0), "max_draft"),
])
def test_bad_medusa_settings_are_refused(medusa_engine, bad, match):
    with pytest.raises(ConfigError, match=match):
        medusa_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4), bad)


def test_medusa_without_heads_is_refused(tiny_engine):
    with pytest.raises(ConfigError, match="no Medusa heads"):
        tiny_engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4),
                              SpecConfig(stream="medusa", max_draft=2))


@pytest.mark.parametrize("damage", ["other_model", "corrupt_weights", "corrupt_card"])
def test_bad_head_files_are_reported_and_adapters_kept(tmp_path, tiny_trained_dir,
                                                       tiny_model_dir, damage):
    root = tmp_path / "trained"
    shutil.copytree(tiny_trained_dir, root)
    folder = root / "tiny"
    card_path = folder / HEADS_CARD
    if damage == "other_model":
        card = json.loads(card_path.read_text())
        card |= {"model_name": "some-other-model", "model_fingerprint": "0123456789abcdef"}
        card_path.write_text(json.dumps(card))
    elif damage == "corrupt_weights":
        (folder / HEADS_FILE).write_bytes(b"not a safetensors file")
    else:
        card_path.write_text("{ broken")
    engine = engine_with_trained(root, tiny_model_dir)
    assert engine.medusa is None and engine.accel is not None
    expected = {"other_model": "some-other-model", "corrupt_weights": "could not be loaded",
                "corrupt_card": "corrupt"}[damage]
    assert expected in engine.medusa_note
    with pytest.raises(ConfigError, match="no Medusa heads"):
        engine.speculate(PROMPT, DecodeConfig(max_new_tokens=4),
                         SpecConfig(stream="medusa", max_draft=2))
