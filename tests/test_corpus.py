"""The distillation corpus (m2r2core/train/corpus.py) on a tiny model: evaluation prompts are
kept out, an interrupted build resumes shard by shard and never leaves a shard that loads half
written, a corpus of another model is refused naming both, and a corpus whose train answers are
not built yet trains on its teacher-forced text alone."""

import argparse
import json
import random

import pytest

from m2r2core import train
from m2r2core.config import EngineConfig
from m2r2core.errors import M2R2Error
from m2r2core.runtime.model import fingerprint, load
from m2r2core.train import corpus, data
from m2r2core.train.distill import Sample


def test_overlap_filter_drops_copies_and_near_copies():
    evals = ["Write a persuasive essay about renewable energy for high school students."]
    overlap = corpus.OverlapFilter(evals)
    assert overlap.overlaps("write a persuasive ESSAY about renewable energy, for high school "
                            "students!")
    assert overlap.overlaps("Please write a persuasive essay about renewable energy for high "
                            "school students.")  # word-trigram Jaccard 0.83
    assert not overlap.overlaps("Summarise the history of the printing press in Europe.")


def test_real_evaluation_prompts_are_all_caught():
    texts = corpus.evaluation_texts()
    assert len(texts) > 800  # MT-Bench's two turns and every AlpacaEval slice
    overlap = corpus.OverlapFilter(texts)
    assert all(overlap.overlaps(t) for t in texts[::50])


def _small_plan(settings, tokenizer, overlap):
    rows = [corpus.Instruction(f"r{n}", "wiki", split, f"Explain topic number {n} briefly.")
            for n, split in enumerate(["dev", "test", "train", "train", "train", "train"])]
    return rows, [], 0


def _small_text(tokenizer, conversations, settings):
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12)["input_ids"]
    return corpus._windows(ids, 0, "text", 32)


def _build(folder, engine, fingerprint="fp-tiny", name="tiny"):
    settings = corpus.Settings(max_new_tokens=4)
    return corpus.build(folder, engine.model, engine.tokenizer, name, fingerprint, settings,
                        batch_size=2, shard_size=2)


def test_build_resumes_by_shard_and_refuses_another_model(tmp_path, tiny_engine, monkeypatch):
    monkeypatch.setattr(corpus, "plan", _small_plan)
    monkeypatch.setattr(corpus, "teacher_forced", _small_text)
    monkeypatch.setattr(corpus, "evaluation_texts", lambda: ["an evaluation prompt"])
    folder = tmp_path / "corpus"
    _build(folder, tiny_engine)
    shards = sorted(p.name for p in (folder / "chat").glob("*.jsonl"))
    assert shards == ["dev-00000.jsonl", "test-00000.jsonl", "train-00000.jsonl",
                      "train-00001.jsonl"]
    assert not list(folder.rglob("*.tmp"))
    # an interrupted build: the last shard is gone; a resume answers only that one again
    kept = (folder / "chat" / "train-00000.jsonl").stat().st_mtime_ns
    (folder / "chat" / "train-00001.jsonl").unlink()
    calls = []
    real = corpus.answer_batch
    monkeypatch.setattr(corpus, "answer_batch",
                        lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    _build(folder, tiny_engine)
    assert calls == [2]
    assert (folder / "chat" / "train-00000.jsonl").stat().st_mtime_ns == kept
    assert len(corpus.load(folder, "train", with_text=False)) == 4
    with pytest.raises(corpus.CorpusError, match="built for 'tiny'.*this run is for 'other'"):
        _build(folder, tiny_engine, fingerprint="fp-other", name="other")
    with pytest.raises(corpus.CorpusError, match="fingerprint fp-tiny"):
        corpus.load(folder, "dev", model_fingerprint="fp-other")


def _fake_sources(monkeypatch, records, n_articles):
    """A small first build, an evaluation prompt, these ShareGPT records and n articles."""
    monkeypatch.setattr(corpus, "plan", _small_plan)
    monkeypatch.setattr(corpus, "teacher_forced", _small_text)
    monkeypatch.setattr(corpus, "evaluation_texts", lambda: ["an evaluation prompt here"])
    monkeypatch.setattr(corpus, "sharegpt_records", lambda: iter(records))
    articles = [{"title": f"Article {n}", "extract": f"Article {n} is about topic {n}.",
                 "description": "a topic"} for n in range(n_articles)]
    monkeypatch.setattr(corpus, "wiki_articles", lambda split: list(articles))
    return articles


def test_a_growth_round_adds_fresh_instructions_and_resumes(tmp_path, tiny_engine, monkeypatch):
    """`corpus --grow`: fresh train instructions (none planned before, no evaluation copy, half
    from each source) in their own plan and shards, read with the train split; a resume answers
    only missing shards; a round planned with another count, or a corpus not built, is refused;
    a second round takes nothing the first took."""
    records = [{"id": f"s{n}", "conversations": [{"from": "human", "value": f"Tell me fact {n}."}]}
               for n in range(40)]
    records.append({"id": "copy", "conversations": [{"from": "human",
                                                     "value": "An evaluation prompt here!"}]})
    articles = _fake_sources(monkeypatch, records, 12)
    folder = tmp_path / "corpus"
    settings = corpus.Settings(max_new_tokens=4, n_wiki=3)
    with pytest.raises(corpus.CorpusError, match="build it first"):
        corpus.grow(folder, tiny_engine.model, tiny_engine.tokenizer, "tiny", "fp-tiny",
                    settings, 4, 1, 2, 2)
    corpus.build(folder, tiny_engine.model, tiny_engine.tokenizer, "tiny", "fp-tiny", settings,
                 batch_size=2, shard_size=2)
    base = len(corpus.finished(folder, "train"))

    def grow(count, round_):
        return corpus.grow(folder, tiny_engine.model, tiny_engine.tokenizer, "tiny", "fp-tiny",
                           settings, count, round_, 2, 2)

    manifest = grow(6, 1)
    planned = corpus.read_jsonl(folder / "plan-grow1.jsonl")
    assert [r["source"] for r in planned].count("sharegpt") == 3 == len(planned) - 3
    assert all(r["split"] == "train" and r["id"] != "copy" for r in planned)
    first_wiki = {a["title"] for a in random.Random(settings.seed + 5).sample(articles, 3)}
    assert not {r["id"].split("/", 1)[1] for r in planned if r["source"] == "wiki"} & first_wiki
    assert manifest["growth"]["1"]["planned"] == 6
    shards = sorted(p.name for p in (folder / "chat").glob("train-g1-*.jsonl"))
    assert len(shards) == 3 and not list(folder.rglob("*.tmp"))
    assert len(corpus.finished(folder, "train")) == base + 6
    assert len(corpus.finished(folder, "train", growth=False)) == base
    (folder / "chat" / shards[-1]).unlink()
    calls = []
    real = corpus.answer_batch
    monkeypatch.setattr(corpus, "answer_batch",
                        lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    grow(6, 1)
    assert calls == [2]
    with pytest.raises(corpus.CorpusError, match="planned with 6 instructions, not 4"):
        grow(4, 1)
    grow(4, 2)
    second = corpus.read_jsonl(folder / "plan-grow2.jsonl")
    assert not {r["id"] for r in second} & {r["id"] for r in planned}
    assert not ({r["id"].split("/", 1)[1] for r in second if r["source"] == "wiki"}
                & {r["id"].split("/", 1)[1] for r in planned if r["source"] == "wiki"})
    assert len(corpus.finished(folder, "train")) == base + 10


def test_a_lost_cache_rebuilds_plans_without_answers_then_one_round(tmp_path, tiny_engine,
                                                                     monkeypatch):
    """A lost cache: `corpus --plan-only` rewrites the first build's plan and a growth round's
    without answering anything (a later round's plan depends on them, and is the same as when
    every earlier round was answered); answering held-out splits and round 2 alone leaves the
    first build's train split and round 1 unanswered."""
    records = [{"id": f"s{n}", "conversations": [{"from": "human", "value": f"Tell me fact {n}."}]}
               for n in range(40)]
    _fake_sources(monkeypatch, records, 12)
    settings = corpus.Settings(max_new_tokens=4, n_wiki=3)
    model, tok = tiny_engine.model, tiny_engine.tokenizer

    def both(folder, answer):
        corpus.build(folder, model, tok, "tiny", "fp-tiny", settings, 2, 2,
                     splits=corpus.SPLITS if answer else ())
        for round_ in (1, 2):
            corpus.grow(folder, model, tok, "tiny", "fp-tiny", settings, 4, round_, 2, 2,
                        answer=answer or round_ == 2)

    full, lost = tmp_path / "full", tmp_path / "lost"
    both(full, True)
    both(lost, False)
    for name in ("plan.jsonl", "plan-grow1.jsonl", "plan-grow2.jsonl"):
        assert (lost / name).read_text() == (full / name).read_text()
    answered = sorted(p.name for p in (lost / "chat").glob("*.jsonl"))
    assert answered and all(name.startswith("train-g2-") for name in answered)
    assert len(corpus.finished(lost, "train")) == 4
    corpus.build(lost, model, tok, "tiny", "fp-tiny", settings, 2, 2, splits=("dev", "test"))
    assert corpus.finished(lost, "dev") and not corpus.finished(lost, "train", growth=False)


def _train_ids(count, prefix):
    """Record ids that the split hash puts in the train split."""
    ids = (f"{prefix}{n}" for n in range(1000))
    return [key for key in ids if corpus.split_of(key) == "train"][:count]


def test_growth_falls_back_to_follow_ups_and_new_templates(tmp_path, tiny_engine, monkeypatch):
    """Once first turns and untouched articles run out, a round takes later ShareGPT user turns
    (answered after their conversation, read back with a short context) and articles again with
    templates they were not asked with; no instruction repeats across rounds."""
    monkeypatch.setattr(corpus, "FOLLOW_UP_CONTEXT", 8)

    def turns(n, *follow_ups):
        out = [{"from": "human", "value": f"Tell me fact {n}."},
               {"from": "gpt", "value": f"Fact {n} is that topic {n} has a long history."}]
        for text in follow_ups:
            out += [{"from": "human", "value": text}, {"from": "gpt", "value": "Sure, here."}]
        return out

    keys = _train_ids(5, "f")
    records = [{"id": key, "conversations": turns(n, f"Why is fact {n} true?",
                                                   f"Give an example of fact {n}.")}
               for n, key in enumerate(keys[:3])]
    records.append({"id": keys[3], "conversations": turns(3, "An evaluation prompt here!")})
    records.append({"id": keys[4], "conversations": turns(4, "Qu'est-ce que c'est, où ?")})
    articles = _fake_sources(monkeypatch, records, 3)
    folder = tmp_path / "corpus"
    settings = corpus.Settings(max_new_tokens=4, n_wiki=2)
    corpus.build(folder, tiny_engine.model, tiny_engine.tokenizer, "tiny", "fp-tiny", settings,
                 batch_size=2, shard_size=4)
    prompts = []
    real = corpus.answer_batch
    monkeypatch.setattr(corpus, "answer_batch",
                        lambda *a, **k: prompts.extend(a[2]) or real(*a, **k))

    def grow(count, round_):
        corpus.grow(folder, tiny_engine.model, tiny_engine.tokenizer, "tiny", "fp-tiny",
                    settings, count, round_, 2, 4)
        return [corpus.Instruction(**r) for r in
                corpus.read_jsonl(folder / f"plan-grow{round_}.jsonl")]

    first = grow(10, 1)
    sources = [i.source for i in first]
    assert sources.count("sharegpt") == 5 and sources.count("sharegpt-followup") == 0
    assert sources.count("wiki") == 5  # one untouched article, then four new templates
    second = grow(10, 2)
    follow_ups = [i for i in second if i.source == "sharegpt-followup"]
    # half the round, of the 6 later turns left once the evaluation copy and the non-ASCII
    # turn are dropped
    assert len(follow_ups) == 5 and len({i.id for i in follow_ups}) == 5
    assert {"An evaluation prompt here!", "Qu'est-ce que c'est, où ?"}.isdisjoint(
        i.text for i in follow_ups)
    record = {r["id"]: r for r in records}
    for instruction in follow_ups:
        key, turn = instruction.id.split("#")
        conversation = record[key]["conversations"]
        assert instruction.text == conversation[int(turn)]["value"]
        assert [m["content"] for m in instruction.history] == \
            [t["value"] for t in conversation[:int(turn)]]
        assert [m["role"] for m in instruction.history][:2] == ["user", "assistant"]
        assert instruction.messages() in prompts  # answered after its conversation
    every = first + second
    assert len({i.id for i in every}) == len(every)
    wiki = [i.text for i in every if i.source == "wiki"]
    assert len(set(wiki)) == len(wiki)
    assert {i.id.split("/", 1)[1] for i in every if i.source == "wiki"} <= \
        {a["title"] for a in articles}
    rows = [r for path in sorted((folder / "chat").glob("train-g2-*.jsonl"))
            for r in corpus.read_jsonl(path) if r["source"] == "sharegpt-followup"]
    loaded = {tuple(s.ids) for s in corpus.grown(folder, "train")}
    assert len(rows) == 5
    # each sample keeps its source (what `train agreement --source` selects by)
    grown_sources = [s.source for s in corpus.grown(folder, "train")]
    assert grown_sources.count("sharegpt-followup") == 5
    assert set(grown_sources) == {"sharegpt", "sharegpt-followup", "wiki"}
    assert {s.source for s in corpus.text_samples(folder)} == {"text"}
    for row in rows:
        cut = row["answer_start"] - 8
        assert cut > 0 and tuple(row["ids"][cut:]) in loaded
        assert "has a long history" in tiny_engine.tokenizer.decode(
            row["ids"][:row["answer_start"]])

    # once the follow-ups run out too: later user turns asked alone, as first turns
    long = [f"Please explain in plain words how process {n} moves water from sea to land."
            for n in range(5)]
    records.append({"id": _train_ids(6, "g")[5], "conversations": [
        {"from": "gpt", "value": "Hello."}, {"from": "human", "value": long[0]},
        {"from": "gpt", "value": "Sure."}, {"from": "human", "value": "go on please"},
        {"from": "gpt", "value": "More."}, {"from": "human", "value": long[0]},  # a repeat
        {"from": "gpt", "value": "Again."}, {"from": "human", "value": "an evaluation prompt here"},
        *[t for text in long[1:] for t in ({"from": "gpt", "value": "Ok."},
                                           {"from": "human", "value": text})]]})
    heldout = next(f"h{n}" for n in range(1000) if corpus.split_of(f"h{n}") != "train")
    records.append({"id": heldout, "conversations": [
        {"from": "gpt", "value": "Hi."}, {"from": "human", "value": long[0] + " Held out."}]})
    third = grow(10, 3)
    alone = [i for i in third if i.source == "sharegpt-turn"]
    assert sum(i.source == "sharegpt-followup" for i in third) == 1  # the last one left
    assert len(alone) == 4 and {i.text for i in alone} <= set(long)
    assert len({i.text for i in alone}) == 4 and all("@" in i.id and not i.history
                                                     for i in alone)
    assert all(i.text in prompts for i in alone)  # answered alone, not after a conversation
    # the evaluation copy as a follow-up, then as a turn alone, and the new record's
    assert json.loads((folder / "manifest.json").read_text())["growth"]["3"][
        "removed_for_overlap"] == 3
    assert {s.source for s in corpus.grown(folder, "train")} >= {"sharegpt-turn"}


def test_a_corrupt_shard_names_itself(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "chat").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_fingerprint": "x"}))
    (folder / "chat" / "dev-00000.jsonl").write_text('{"ids": [1, 2], "answer_st')
    with pytest.raises(corpus.CorpusError, match="dev-00000.jsonl is corrupt"):
        corpus.load(folder, "dev")


def _write_split(folder, split, samples):
    corpus.write_jsonl(folder / "chat" / f"{split}-00000.jsonl",
                       [{"ids": s.ids, "answer_start": s.answer_start} for s in samples])


def test_train_answers_not_built_yet_mean_text_only(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "chat").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_fingerprint": "fp"}))
    chat = [Sample([5, 6, 7, 8], 2, "chat")] * 3
    _write_split(folder, "dev", chat)
    _write_split(folder, "test", chat)
    text = [Sample(list(range(10, 30)), 0, "text") for _ in range(12)]
    corpus.write_jsonl(folder / "text.jsonl",
                       [{"ids": s.ids, "answer_start": 0, "kind": "text"} for s in text])
    args = argparse.Namespace(corpus=folder, data=None, model="tiny", seed=0, text_share=0.3)
    splits, note = data.datasets(args, "fp")
    assert len(splits["train"]) == 12 and splits["router"] == []  # every window, not 0.3 of none
    assert "text only" in note
    _write_split(folder, "train", [Sample([5, 6, 7, 8, 9], 2, "chat")] * 20)
    splits, note = data.datasets(args, "fp")
    answers = [s for s in splits["train"] if s.kind == "chat"]
    assert len(answers) == 18 and len(splits["router"]) == 2
    assert len(splits["train"]) - len(answers) == round(18 * 0.3 / 0.7)
    assert "text only" not in note
    with pytest.raises(corpus.CorpusError, match="fingerprint fp"):
        data.datasets(args, "another")


def test_fresh_share_puts_a_growth_rounds_answers_first(tmp_path):
    """--fresh-share: every growth answer of the train split, plus a seeded sample of the first
    build's making up the rest; refused without a growth round or outside (0, 1]."""
    folder = tmp_path / "corpus"
    (folder / "chat").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_fingerprint": "fp"}))
    _write_split(folder, "dev", [Sample([5, 6, 7, 8], 2, "chat")])
    _write_split(folder, "test", [Sample([5, 6, 7, 8], 2, "chat")])
    first = [Sample([5, 6, 7, n], 2, "chat") for n in range(100, 140)]
    _write_split(folder, "train", first)

    def args(share, seed=0):
        return argparse.Namespace(corpus=folder, data=None, model="tiny", seed=seed,
                                  text_share=None, fresh_share=share)

    with pytest.raises(M2R2Error, match="needs a growth round"):
        data.datasets(args(0.5), "fp")
    grown = [Sample([5, 6, 7, n], 2, "chat") for n in range(500, 520)]
    corpus.write_jsonl(folder / "chat" / "train-g1-00000.jsonl",
                       [{"ids": s.ids, "answer_start": 2} for s in grown])
    splits, note = data.datasets(args(None), "fp")
    assert len(splits["train"]) == 54 and "growth" not in note  # 9 in 10 of all 60, alike
    splits, note = data.datasets(args(0.6), "fp")
    train = splits["train"]
    fresh = [s for s in train if s.ids[-1] >= 500]
    old = [s for s in train if s.ids[-1] < 500]
    assert len(fresh) == 18 and len(old) == 12  # growth's 18 train answers are 0.6 of 30
    assert {s.ids[-1] for s in fresh} == {s.ids[-1] for i, s in enumerate(first + grown)
                                          if i % 10 and s.ids[-1] >= 500}
    assert all(s.ids[-1] % 10 for s in old)  # never one the routers keep (every tenth)
    assert "18 from growth rounds, 12 from the first build" in note
    assert len(splits["router"]) == 6  # the router split is unchanged by the mix
    again, _ = data.datasets(args(0.6), "fp")
    assert again["train"] == train
    other, _ = data.datasets(args(0.6, seed=1), "fp")
    assert other["train"] != train
    alone, _ = data.datasets(args(1.0), "fp")
    assert alone["train"] == fresh
    for bad in (0.0, 1.5):
        with pytest.raises(M2R2Error, match="above 0 and at most 1"):
            data.datasets(args(bad), "fp")
    # a second round: --fresh-rounds 2 counts only its answers as fresh, round 1 joins the old
    second = [Sample([5, 6, 7, n], 2, "chat") for n in range(700, 720)]
    corpus.write_jsonl(folder / "chat" / "train-g2-00000.jsonl",
                       [{"ids": s.ids, "answer_start": 2} for s in second])
    assert list(corpus.growth_rounds(folder, "train")) == [1, 2]
    both, _ = data.datasets(args(0.6), "fp")
    assert len([s for s in both["train"] if s.ids[-1] >= 500]) == 36
    latest = argparse.Namespace(**vars(args(0.6)), fresh_rounds=[2])
    splits, note = data.datasets(latest, "fp")
    train = splits["train"]
    assert [s.ids[-1] for s in train[:18]] == [s.ids[-1] for i, s in
                                               enumerate(first + grown + second)
                                               if i % 10 and s.ids[-1] >= 700]
    assert all(s.ids[-1] < 700 and s.ids[-1] % 10 for s in train[18:]) and len(train) == 30
    assert any(500 <= s.ids[-1] < 700 for s in train[18:])  # round 1 sampled with the old
    assert "18 from growth round 2, 12 from the first build and older rounds" in note
    assert len(splits["router"]) == 8  # every tenth of all 80, as before
    with pytest.raises(M2R2Error, match="growth rounds 1, 2"):
        data.datasets(argparse.Namespace(**vars(args(0.6)), fresh_rounds=[3]), "fp")
    with pytest.raises(M2R2Error, match="give --fresh-share too"):
        data.datasets(argparse.Namespace(**vars(args(None)), fresh_rounds=[2]), "fp")


def test_routers_without_train_answers_say_what_to_run(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "corpus"
    (folder / "chat").mkdir(parents=True)
    fp = fingerprint(load(EngineConfig(model=str(tiny_model_dir), dtype="float32")).model)
    (folder / "manifest.json").write_text(json.dumps({"model_fingerprint": fp}))
    for split in ("dev", "test"):
        _write_split(folder, split, [Sample(list(range(5, 40)), 4, "chat")] * 2)
    corpus.write_jsonl(folder / "text.jsonl",
                       [{"ids": list(range(10, 60)), "answer_start": 0, "kind": "text"}] * 3)
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="none is built yet"):
        train.main(["routers", "--model", str(tiny_model_dir), "--dtype", "float32",
                    "--corpus", str(folder), "--out", str(tmp_path / "out"),
                    "--seq-len", "48"])
    assert not (tmp_path / "out").exists()


def test_batched_answers_equal_one_at_a_time_and_leave_the_head_as_it_was(tiny_engine):
    from m2r2core.train.distill import answer_batch

    model, tokenizer = tiny_engine.model, tiny_engine.tokenizer
    head = model.get_output_embeddings()
    prompts = ["Name a colour.", "Explain why the sky looks blue at noon on a clear day.",
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Count to three."}]]
    batched = answer_batch(model, tokenizer, prompts, max_new_tokens=6)
    alone = [answer_batch(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert [s.ids for s in batched] == [s.ids for s in alone]
    assert [s.answer_start for s in batched] == [s.answer_start for s in alone]
    assert all(len(s.ids) > s.answer_start for s in batched)
    assert not head._forward_pre_hooks  # the contiguity hook is gone after the call


def test_greedy_answers_equal_generate_while_finished_rows_leave(tiny_engine, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from m2r2core.runtime.prompt import encode
    from m2r2core.train.distill import greedy_answers
    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = False  # a random head of its own: varied tokens, not one
    torch.manual_seed(3)
    model, tokenizer = AutoModelForCausalLM.from_config(config).eval(), tiny_engine.tokenizer
    texts = ["Name a colour.", "Explain why the sky looks blue at noon on a clear day.",
             "Hi", "List three rivers of Europe and say which is longest.", "Why?",
             "Write one sentence about the moon."]
    encoded = [encode(tokenizer, t) for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    generation = model.generation_config
    monkeypatch.setattr(generation, "eos_token_id", [model.config.vocab_size - 1])
    unstopped = greedy_answers(model, ids, mask, 10)
    assert all(len(a) == 10 for a in unstopped)
    stop = next(t for t in unstopped[0] if any(t not in a for a in unstopped[1:]))
    monkeypatch.setattr(generation, "eos_token_id", [stop])
    selects = []
    real_select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, index: (selects.append(index.tolist()),
                                             real_select(self, index))[1])
    ours = greedy_answers(model, ids, mask, 10)
    reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=10, pad_token_id=0)[:, width:].tolist()
    cut = [row[:row.index(stop) + 1] if stop in row else row for row in reference]
    assert ours == cut
    assert len(ours[0]) < 10 and any(len(a) == 10 for a in ours)  # some leave, some run on
    assert selects  # finished rows did leave the batch
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_quality_answers_to_ids_are_the_batched_answers_and_tuning_needs_a_corpus(
        tiny_engine, tmp_path, monkeypatch):
    """The MoE quality check's tuning split answers already-templated prompt ids as its reported
    split answers prompt texts; without a distillation corpus it says how to build one."""
    from m2r2core.runtime.prompt import encode
    from m2r2core.train import corpus, moe_quality

    model, tokenizer = tiny_engine.model, tiny_engine.tokenizer
    prompts = ["Name a colour.", "Explain why the sky looks blue at noon on a clear day."]
    rows = [encode(tokenizer, p, True, None) for p in prompts]
    assert (moe_quality.answers_to_ids(model, tokenizer, rows, 5)
            == moe_quality.batched_answers(model, tokenizer, prompts, 5))
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path))
    with pytest.raises(corpus.CorpusError, match="build it with"):
        moe_quality.tuning_sets(4, 2)
