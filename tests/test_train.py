"""The training CLIs end to end on a tiny model: adapters reduce the loss and resume from their
checkpoint, routers train and load, empty or corrupt data is refused without writing anything."""

import json
from pathlib import Path

import pytest

from m2r2core import train
from m2r2core.errors import AssetMissing
from m2r2core.exits.routers import ROUTER_CARD
from m2r2core.stream.accel import CARD_NAME, WEIGHTS_NAME
from m2r2core.train import distill


@pytest.fixture()
def corpus(tmp_path, tiny_engine):
    tok = tiny_engine.tokenizer
    articles = distill.wiki_articles("train")[:40]
    samples = distill.text_samples(tok, articles, 40, 48, seed=0)
    path = tmp_path / "corpus.jsonl"
    distill.save(samples, path)
    return path


def test_adapters_then_routers(tmp_path, corpus, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--out", str(out)]
    train.main(["adapters", *common, "--steps", "6", "--batch-size", "4", "--save-every", "3",
                "--kl-positions", "16", "--rate", "2"])
    card = json.loads((out / CARD_NAME).read_text())
    assert card["training"]["steps"] == 6 and (out / WEIGHTS_NAME).is_file()
    log = (train.work_dir(str(tiny_model_dir)) / "adapters-r2" / "metrics.jsonl").read_text()
    losses = [json.loads(line)["loss"] for line in log.splitlines()]
    assert len(losses) == 6 and min(losses[3:]) < losses[0]
    # resume: asking for more steps continues from step 6
    train.main(["adapters", *common, "--steps", "8", "--batch-size", "4", "--save-every", "4",
                "--kl-positions", "16", "--rate", "2"])
    log = (train.work_dir(str(tiny_model_dir)) / "adapters-r2" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in log.splitlines()]
    assert [r["step"] for r in rows][-3:] == [6, 7, 8]
    assert rows[-2]["tokens"] > rows[-3]["tokens"]  # the token count continues too
    card = json.loads((out / CARD_NAME).read_text())
    at_step = {r["step"]: r["tokens"] for r in rows}
    assert card["training"]["tokens_this_run"] == at_step[card["training"]["step"]]
    assert "held_out_lens_agreement" in card["metrics"]  # the best's test figures, at the end
    # the same measurement on the train split: the generalisation gap
    report = tmp_path / "train-agreement.json"
    train.main(["agreement", *common, "--adapters", str(out), "--split", "train", "--skip", "1",
                "--limit", "3", "--report", str(report)])
    found = json.loads(report.read_text())
    assert found["split"] == "train" and found["samples"] == 3 and found["skip"] == 1
    assert len(found["agreement"]["fast"]) == len(card["metrics"]["held_out_lens_agreement"]
                                                  ["fast"])
    with pytest.raises(SystemExit, match="leaves none"):
        train.main(["agreement", *common, "--adapters", str(out), "--split", "dev",
                    "--skip", "100000"])
    with pytest.raises(SystemExit, match="has 0 wiki samples"):  # an old-style corpus
        train.main(["agreement", *common, "--adapters", str(out), "--source", "wiki"])
    with pytest.raises(SystemExit, match="name their source"):
        train.main(["gap", *common, "--adapters", str(out)])
    train.main(["routers", *common, "--check-vocab", "256", "--per-sample", "8",
                "--epochs", "2"])
    rcard = json.loads((out / ROUTER_CARD).read_text())
    assert set(rcard["max_depth"]) == {"arla/fast", "mlp/fast", "arla/slow", "mlp/slow"}
    assert len(rcard["metrics"]["lens_agreement/slow"]) == 4


def test_gap_slices_take_each_sources_first_answers():
    """The gap's slices: the first N answers of each source in the held-out and train splits, in
    GAP_SLICES order; a source the corpus lacks is left out, text windows are never a slice."""
    def samples(*sources):
        return [distill.Sample([1, 2, n], 1, "chat", source) for n, source in enumerate(sources)]

    splits = {"test": samples("wiki", "sharegpt", "wiki", "sharegpt"),
              "train": samples("sharegpt", "wiki", "sharegpt", "sharegpt", "text")}
    slices = train.gap_slices(splits, 2)
    assert [(split, source, [s.ids[-1] for s in chosen]) for split, source, chosen in slices] == [
        ("test", "sharegpt", [1, 3]), ("test", "wiki", [0, 2]), ("train", "sharegpt", [0, 2]),
        ("train", "wiki", [1])]


def test_gap_measures_each_slice_of_a_corpus(tmp_path, corpus, tiny_engine, tiny_model_dir,
                                             monkeypatch):
    """`train gap` on a corpus folder: one row per slice the corpus has, each the agreement
    `train agreement --source` measures on the same samples."""
    from m2r2core.runtime.model import fingerprint
    from m2r2core.train.corpus import write_jsonl

    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    windows = distill.load(corpus)
    folder = tmp_path / "built"
    (folder / "chat").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"version": 1, "model_name": "tiny", "model_fingerprint": fingerprint(tiny_engine.model)}))
    for split, rows in (("test", windows[:6]), ("dev", windows[6:8]), ("train", windows[8:28])):
        write_jsonl(folder / "chat" / f"{split}-00000.jsonl", [
            {"ids": w.ids, "answer_start": 4, "kind": "chat", "split": split,
             "source": ("sharegpt", "wiki")[n % 2]} for n, w in enumerate(rows)])
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--corpus", str(folder)]
    train.main(["adapters", *common, "--out", str(out), "--steps", "2", "--batch-size", "4",
                "--kl-positions", "16", "--rate", "2"])
    report = tmp_path / "gap.json"
    with pytest.raises(SystemExit, match="--limit counts samples per slice"):
        train.main(["gap", *common, "--adapters", str(out), "--limit", "0", "--report",
                    str(report)])
    assert not report.exists()
    train.main(["gap", *common, "--adapters", str(out), "--limit", "3", "--report", str(report)])
    rows = json.loads(report.read_text())["slices"]
    assert [(r["split"], r["source"], r["samples"]) for r in rows] == [
        ("test", "sharegpt", 3), ("test", "wiki", 3), ("train", "sharegpt", 3),
        ("train", "wiki", 3)]
    one = tmp_path / "one.json"
    train.main(["agreement", *common, "--adapters", str(out), "--split", "test", "--source",
                "wiki", "--report", str(one)])
    assert json.loads(one.read_text())["agreement"]["fast"] == rows[1]["agreement"]


def test_greedy_soup_keeps_what_does_not_hurt():
    """Ingredients join in falling dev order, each only when the average with it scores at least
    as well; every trial is reported."""
    from m2r2core.train.soup import greedy_soup

    scores = {"a": 0.40, "b": 0.45, "c": 0.42}
    by_soup = {("b", "c"): 0.44, ("b", "a"): 0.46}
    kept, best, trials = greedy_soup(scores, lambda names: by_soup[tuple(names)])
    assert kept == ["b", "a"] and best == 0.46
    assert [(t["soup"], t["kept"]) for t in trials] == [
        (["b"], True), (["b", "c"], False), (["b", "a"], True)]


def test_soup_averages_ingredients_and_measures_it(tmp_path, corpus, tiny_model_dir,
                                                   monkeypatch):
    """`train soup` writes the average of the ingredients it keeps (as saved: bfloat16), with a
    card naming them and its dev and test figures; one ingredient, a missing --out or another
    adapter shape is refused before anything is written."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus)]
    folders = []
    for seed, rank in ((1, 4), (2, 4), (3, 8)):
        folders.append(tmp_path / f"run{seed}")
        train.main(["adapters", *common, "--out", str(folders[-1]), "--steps", "2",
                    "--batch-size", "4", "--kl-positions", "16", "--rate", "2", "--rank",
                    str(rank), "--seed", str(seed), "--lr", "0.05", "--run-name", f"s{seed}"])
    out = tmp_path / "soup"
    for bad, message in (([folders[0]], "at least two"), (folders, "another adapter shape")):
        with pytest.raises(SystemExit, match=message):
            train.main(["soup", *common, "--out", str(out), "--ingredients", *map(str, bad)])
    with pytest.raises(SystemExit, match="--out"):
        train.main(["soup", *common, "--ingredients", *map(str, folders[:2])])
    assert not out.exists()
    report = tmp_path / "soup.json"
    monkeypatch.setattr(Path, "home", lambda: tmp_path)  # paths under home are written as ~
    train.main(["soup", *common, "--out", str(out), "--ingredients", *map(str, folders[:2]),
                "--report", str(report)])
    found = json.loads(report.read_text())
    assert set(found["ingredients"]) == {"run1", "run2"} and len(found["trials"]) == 2
    assert "~/run1" in found["command"] and found["out"] == "~/soup"
    assert str(tmp_path) not in json.dumps(found)  # a committed report names no home folder
    assert not json.loads(report.read_text())["out"].startswith("/")
    card = json.loads((out / CARD_NAME).read_text())
    assert card["training"]["soup"] == found["soup"] and card["training"]["run"] == "soup"
    runs = [json.loads((f / CARD_NAME).read_text())["training"] for f in folders[:2]]
    assert card["training"]["tokens_this_run"] == sum(
        runs[int(n[-1]) - 1]["tokens_this_run"] for n in found["soup"])
    assert card["training"]["kl_positions"] == 16 and "seed" not in card["training"] or \
        len(found["soup"]) == 1  # shared settings stay, the seeds differed
    assert card["metrics"]["held_out_lens_agreement"]["fast"] == found["test_agreement"]
    weights = [load_file(str(f / WEIGHTS_NAME)) for f in folders[:2]]
    kept = [weights[int(name[-1]) - 1] for name in found["soup"]]
    soup = load_file(str(out / WEIGHTS_NAME))
    for key, value in soup.items():
        mean = torch.stack([w[key].float() for w in kept]).mean(0).to(torch.bfloat16)
        assert torch.equal(value, mean), key
    # a run's checkpoint (where it stopped) is an ingredient too, beside a saved folder
    run2 = next((tmp_path / "cache").rglob("s2/checkpoint.pt")).parent
    with pytest.raises(SystemExit, match="at least one saved adapter folder"):
        train.main(["soup", *common, "--out", str(tmp_path / "x"), "--ingredients",
                    str(run2), str(run2 / "checkpoint.pt")])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="Cannot use .*broken.pt"):
        train.main(["soup", *common, "--out", str(tmp_path / "x"), "--ingredients",
                    str(folders[0]), str(broken)])
    assert not (tmp_path / "x").exists()
    mixed = tmp_path / "mixed"
    train.main(["soup", *common, "--out", str(mixed), "--ingredients", str(folders[0]),
                str(run2), "--report", str(report)])
    found = json.loads(report.read_text())
    assert set(found["ingredients"]) == {"run1", "s2@2"}
    card = json.loads((mixed / CARD_NAME).read_text())["training"]
    assert card["ingredient_runs"].get("s2@2", {"step": 2})["step"] == 2
    state = torch.load(run2 / "checkpoint.pt", weights_only=False)["adapters"]
    parts = {"run1": {k: v.float() for k, v in weights[0].items()}, "s2@2": state}
    soup = load_file(str(mixed / WEIGHTS_NAME))
    for key, value in soup.items():
        mean = torch.stack([parts[n][key].float() for n in found["soup"]]).mean(0)
        assert torch.equal(value, mean.to(torch.bfloat16)), key


def test_empty_or_corrupt_data_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(AssetMissing, match="no usable sequence"):
        distill.load(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"ids": [1, 2')
    with pytest.raises(AssetMissing, match="corrupt"):
        distill.load(broken)
    with pytest.raises(AssetMissing, match="No training data"):
        distill.load(tmp_path / "missing.jsonl")


def test_cli_reports_bad_data_without_traceback(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match="error: .*no usable sequence"):
        train.main(["adapters", "--model", str(tiny_model_dir), "--data", str(empty),
                    "--out", str(out)])
    assert not out.exists()


def test_held_out_agreement_of_zero_adapters_is_the_slow_streams(tiny_engine, corpus):
    """With zero adapters the fast stream is the slow stream, so its teacher-forced agreement at
    each depth is the slow stream's at the same layer; the last layer agrees with itself."""
    from m2r2core.stream.accel import AccelConfig, Accelerator

    parts = tiny_engine.parts
    accel = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0))
    result = train.held_out_agreement(parts, accel, distill.load(corpus)[:6], 48)
    assert len(result["fast"]) == accel.n_fast and len(result["slow"]) == parts.n_layers
    assert result["fast"] == [result["slow"][d - 1] for d in accel.depths]
    assert result["slow"][-1] == 1.0


def test_adapter_dropout_regularises_training_only(tmp_path, corpus, tiny_engine,
                                                  tiny_model_dir, monkeypatch):
    """--adapter-dropout drops adapter inputs while training, never while measuring: held-out
    agreement is the same with and without it and leaves the adapters' mode as it found it; the
    card records it, and a share outside [0, 1) is refused before anything is written."""
    import torch

    from m2r2core.stream.accel import AccelConfig, Accelerator, LowRank

    parts = tiny_engine.parts
    accel = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0), seed=1)
    for module in accel.modules():
        if isinstance(module, LowRank):
            torch.nn.init.normal_(module.B, std=0.5)
    samples = distill.load(corpus)[:6]
    plain = train.held_out_agreement(parts, accel, samples, 48)
    train.set_dropout(accel, 0.5)
    assert train.held_out_agreement(parts, accel, samples, 48) == plain and accel.training
    adapter = next(m for m in accel.modules() if isinstance(m, LowRank))
    x = torch.randn(3, adapter.A.shape[1])
    assert not torch.equal(adapter(x), adapter(x))  # a fresh mask per call while training
    adapter.eval()
    assert torch.equal(adapter(x), adapter(x))

    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--out", str(out), "--steps", "2", "--batch-size", "4",
              "--kl-positions", "16", "--rate", "2"]
    with pytest.raises(SystemExit, match="--adapter-dropout must be in"):
        train.main(["adapters", *common, "--adapter-dropout", "1"])
    assert not out.exists()
    train.main(["adapters", *common, "--adapter-dropout", "0.2", "--run-name", "dropped"])
    assert json.loads((out / CARD_NAME).read_text())["training"]["adapter_dropout"] == 0.2


def test_biased_adapters_with_chosen_kl_depths(tmp_path, corpus, tiny_model_dir, monkeypatch):
    """--bias and --kl-depths train and are recorded in the card with the held-out agreement;
    a KL depth outside the fast stream is refused before anything is written."""
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--out", str(out), "--steps", "3", "--batch-size", "4",
              "--kl-positions", "16", "--rate", "2", "--bias"]
    with pytest.raises(SystemExit, match="error: --kl-depths \\[9\\] are not fast depths"):
        train.main(["adapters", *common, "--kl-depths", "2", "9"])
    assert not out.exists()
    train.main(["adapters", *common, "--kl-depths", "2", "--run-name", "biased"])
    card = json.loads((out / CARD_NAME).read_text())
    assert card["config"]["bias"] is True and card["training"]["kl_depths"] == [2]
    assert len(card["metrics"]["held_out_lens_agreement"]["fast"]) == 4  # ceil(4 / 2) + margin 2
    log = (train.work_dir(str(tiny_model_dir)) / "biased" / "metrics.jsonl").read_text()
    first = json.loads(log.splitlines()[0])
    assert "kl@2" in first and "kl@1" not in first


def test_kl_depth_weights_scale_each_depths_kl(tiny_engine, corpus):
    """--kl-depth-weights multiply each exit depth's KL in the loss (weight 0 leaves that depth's
    KL out of the gradient, while its metrics are still logged); a count that does not match
    --kl-depths is an error."""
    import torch

    from m2r2core.stream.accel import AccelConfig, Accelerator, LowRank
    from m2r2core.train.adapters import adapter_loss
    from m2r2core.train.data import batches

    parts = tiny_engine.parts
    accel = Accelerator(parts, AccelConfig(rate=2.0, rank=4, margin=0), seed=1)
    for module in accel.modules():
        if isinstance(module, LowRank):
            torch.nn.init.normal_(module.B, std=0.5)
    ids, lengths, starts = next(batches(distill.load(corpus), 4, 48, 0))

    def loss(depths, weights=()):
        return adapter_loss(parts, accel, ids, lengths, 1.0, 16, 1,
                            torch.Generator().manual_seed(0), starts, depths,
                            kl_depth_weights=weights)

    both, metrics = loss((1, 2))
    alone, _ = loss((1,))
    assert torch.allclose(loss((1, 2), (1.0, 0.0))[0], alone)
    doubled, _ = loss((1, 2), (1.0, 2.0))
    assert torch.allclose(doubled - both, torch.tensor(metrics["kl@2"]), atol=1e-5)
    with pytest.raises(ValueError):
        loss((1, 2), (1.0,))


def test_selection_depths_choose_the_best_and_are_recorded(tmp_path, corpus, tiny_model_dir,
                                                           monkeypatch):
    """--select-depths makes the dev score the mean agreement at those depths (logged and in the
    card); weights that do not match --kl-depths, or a selection depth outside the fast stream,
    are refused before anything is written."""
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--out", str(out), "--steps", "2", "--batch-size", "4",
              "--kl-positions", "16", "--rate", "2", "--kl-depths", "1", "2"]
    with pytest.raises(SystemExit, match="gives 1 weights for 2 --kl-depths"):
        train.main(["adapters", *common, "--kl-depth-weights", "2"])
    with pytest.raises(SystemExit, match="--select-depths \\[7\\] are not fast depths"):
        train.main(["adapters", *common, "--select-depths", "1", "7"])
    assert not out.exists()
    train.main(["adapters", *common, "--kl-depth-weights", "3", "1", "--select-depths", "1", "2",
                "--eval-every", "1", "--run-name", "selected"])
    card = json.loads((out / CARD_NAME).read_text())
    assert card["training"]["kl_depth_weights"] == [3.0, 1.0]
    assert card["training"]["select_depths"] == [1, 2]
    rows = [json.loads(line) for line in (train.work_dir(str(tiny_model_dir)) / "selected"
                                          / "eval.jsonl").read_text().splitlines()]
    for row in rows:
        fast = row["dev_lens_agreement"]["fast"]
        assert row["dev_score"] == pytest.approx((fast[0] + fast[1]) / 2)


def test_a_run_from_init_must_beat_its_start_to_replace_it(tmp_path, corpus, tiny_model_dir,
                                                            monkeypatch):
    """Continuing from saved adapters, the adapters started from are evaluated first (step 0)
    and are replaced only by an evaluation that beats them: a run that does not improve leaves
    the committed files as they were."""
    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    start, out = tmp_path / "start", tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--batch-size", "4", "--kl-positions", "16", "--rate", "2"]
    train.main(["adapters", *common, "--steps", "4", "--out", str(start), "--run-name", "a"])
    train.main(["adapters", *common, "--steps", "4", "--out", str(out), "--run-name", "b",
                "--init", str(start), "--eval-every", "2", "--lr", "1e-9"])
    evals = [json.loads(line) for line in (train.work_dir(str(tiny_model_dir)) / "b"
                                           / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    improved = any(e["dev_score"] > evals[0]["dev_score"] for e in evals[1:])
    assert (out / WEIGHTS_NAME).is_file() == improved


def test_a_best_saved_before_an_interruption_is_tested_when_the_run_ends(tmp_path, corpus,
                                                                         tiny_model_dir,
                                                                         monkeypatch):
    """A run killed after saving its best (no test figures yet) and resumed with no better
    state still measures that best's test figures when it ends."""
    from m2r2core.train import adapters

    monkeypatch.setenv("M2R2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "trained"
    common = ["--model", str(tiny_model_dir), "--dtype", "float32", "--seq-len", "48",
              "--data", str(corpus), "--out", str(out), "--batch-size", "4",
              "--kl-positions", "16", "--eval-every", "2", "--save-every", "2",
              "--run-name", "interrupted"]
    real = adapters.AdapterTraining.test_best
    monkeypatch.setattr(adapters.AdapterTraining, "test_best", lambda self: None)  # "killed"
    train.main(["adapters", *common, "--steps", "2"])
    card = json.loads((out / CARD_NAME).read_text())
    assert "held_out_lens_agreement" not in card["metrics"]
    monkeypatch.setattr(adapters.AdapterTraining, "test_best", real)
    monkeypatch.setattr(adapters.AdapterTraining, "evaluate",  # no better state after resume
                        lambda self, save=True: self.run.save(self.accel, self.optim, self.step,
                                                              self.best, self.tokens))
    train.main(["adapters", *common, "--steps", "4"])
    card = json.loads((out / CARD_NAME).read_text())
    assert card["training"]["step"] == 2 and "held_out_lens_agreement" in card["metrics"]


def test_training_commands_run_on_the_threads_they_are_given(tiny_model_dir):
    """--threads reaches torch (the trainers load through `load`, not `Engine.load`)."""
    import argparse

    import torch

    from m2r2core.train.common import frozen_model

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        frozen_model(argparse.Namespace(seed=0, threads=want, model=str(tiny_model_dir),
                                        dtype="float32", data=None))
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_gpu_script_continues_the_committed_adapters_in_their_shape():
    """`./studio gpu-train` starts from the committed adapters (--init), so it must ask for
    their rank and design: a different rank or a missing bias is refused by `init_adapters`,
    and a lent GPU's minutes would be lost to the error."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "studio").read_text()
    block = script[script.index("gpu-train)"):]
    block = block[:block.index(";;")].replace("\\\n", " ")
    words = shlex.split(block[block.index("m2r2core.train adapters"):])
    card = json.loads((root / "artifacts" / "smollm2-135m-instruct" / CARD_NAME).read_text())
    assert "--init" in words
    assert int(words[words.index("--rank") + 1]) == card["config"]["rank"]
    assert int(words[words.index("--margin") + 1]) == card["config"]["margin"]
    assert ("--bias" in words) == card["config"]["bias"]
    assert re.search(r"--device cuda", block)


def test_teacher_kl_equals_kl_div_in_value_and_gradient():
    import torch
    from torch.nn import functional as F

    from m2r2core.train.adapters import Teacher, top_token

    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(7, 50, generator=gen) * 3
    student_logits = torch.randn(7, 50, generator=gen, requires_grad=True)
    teacher = Teacher.of(teacher_logits)
    ours = teacher.kl(F.log_softmax(student_logits, -1))
    (ours_grad,) = torch.autograd.grad(ours, student_logits)
    reference = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1),
                         log_target=True, reduction="batchmean")
    (reference_grad,) = torch.autograd.grad(reference, student_logits)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(ours_grad, reference_grad, atol=1e-7)
    assert float(teacher.kl(teacher.log_probs)) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(teacher.top, teacher_logits.argmax(-1))
    ties = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    assert top_token(ties).tolist() == [1, 0]  # the first maximum, as argmax
