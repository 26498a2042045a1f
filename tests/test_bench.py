"""The benchmark CLI runs in-process on the tiny model and a JSONL prompts file."""

import json
import warnings

from analysis import bench
from analysis.prompts import load_prompts


def test_bench_cli_writes_a_report(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"turns": ["Name a colour."], "category": "x"}\n')
    out = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)
        bench.main(["--prompts", str(prompts), "--model", str(tiny_model_dir), "--dtype",
                    "float32", "--max_new_tokens", "6", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["prompts"] == 2
    assert summary["identical_outputs"] == {"hf_generate": 2, "engine": 2, "engine_traced": 2}
    assert set(summary["median_tokens_per_s"]) == set(bench.METHODS)
    assert report["environment"]["torch"]


def test_named_prompt_sets_are_real():
    mt = load_prompts("mt-bench")
    assert len(mt) == 80 and {p.category for p in mt} >= {"writing", "coding", "math"}
    assert len(load_prompts("koala")) == 156
    assert len(load_prompts("selfinstruct", limit=5)) == 5


def test_spec_bench_cli_reports_speed_identity_and_break_even(tiny_model_dir, tmp_path):
    """spec_bench in-process on the tiny model: every method timed against generate, fp32
    outputs identical, and a break-even line per drafter whose prediction uses its own costs."""
    from analysis import spec_bench
    out = tmp_path / "s.json"
    spec_bench.main(["--prompts", "mt-bench", "--limit", "2", "--model", str(tiny_model_dir),
                     "--dtype", "float32", "--max-new-tokens", "12", "--repeats", "1",
                     "--slow-draft-layer", "2", "--max-draft", "3", "--draft-vocab", "full",
                     "--min-confidence", "0.2", "--methods", "hf_generate", "spec_slow",
                     "--out", str(out)])
    report = json.loads(out.read_text())
    overall = report["summary"]["overall"]
    assert overall["spec_slow"]["identical"] == overall["spec_slow"]["prompts"] == 2
    assert report["spec_configs"]["spec_slow"]["draft_weights"] == "int8"
    assert report["spec_configs"]["spec_slow"]["min_confidence"] == 0.2
    line = report["summary"]["break_even"]["spec_slow"]
    assert set(report["summary"]["break_even"]) == {"spec_slow"}  # generate drafts nothing
    assert 0 < line["mean_drafted"] <= 3 and 0 <= line["mean_accepted"] <= line["mean_drafted"]
    assert line["draft_cost"] > 0 and line["verify_cost"] > 0
    want = (line["mean_accepted"] + 1) / (line["mean_drafted"] * line["draft_cost"]
                                          + line["verify_cost"])
    assert abs(line["predicted_speedup"] - want) < 1e-9
    assert line["needed_accepted"]["1.5x"] > line["needed_accepted"]["1.0x"]


def test_spec_bench_measures_narrow_against_plain_verification(tiny_model_dir, tmp_path):
    from analysis import spec_bench
    out = tmp_path / "s.json"
    spec_bench.main(["--prompts", "mt-bench", "--limit", "1", "--model", str(tiny_model_dir),
                     "--dtype", "float32", "--max-new-tokens", "8", "--repeats", "1",
                     "--slow-draft-layer", "2", "--draft-vocab", "full", "--narrow-verify", "on",
                     "--methods", "hf_generate", "spec_slow", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["spec_configs"]["spec_slow"]["narrow_verify"] == "on"
    assert report["summary"]["overall"]["spec_slow"]["identical"] == 1


def test_dtype_bench_times_narrow_products(tiny_model_dir, tmp_path):
    from analysis import dtype_bench
    out = tmp_path / "d.json"
    dtype_bench.main(["--model", str(tiny_model_dir), "--rows", "1", "3", "--repeats", "1",
                      "--dtypes", "float32", "--narrow", "--out", str(out)])
    table = json.loads(out.read_text())["table"]
    assert [row["rows"] for row in table] == [1, 3]
    for row in table:
        assert row["float32_ms"] > 0 and row["float32+narrow_ms"] > 0
        plain, narrow = row["float32_ms"], row["float32+narrow_ms"]
        # the times are rounded to 0.01 ms and the ratio (of the unrounded times) to 0.001; on a
        # fast CPU the tiny model's times are hundredths of a millisecond, so the ratio is
        # checked against the interval the rounded times allow
        low, high = (narrow - 0.005) / (plain + 0.005), (narrow + 0.005) / (plain - 0.005)
        assert low - 0.0005 <= row["float32_narrow_over_plain"] <= high + 0.0005
    assert "bf16_over_fp32" not in table[0]


def test_answer_bench_compares_generate_with_the_corpus_loop(tiny_model_dir, tmp_path):
    from m2r2core.train import answer_bench
    out = tmp_path / "a.json"
    answer_bench.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--batch", "3",
                       "--skip", "0", "--max-new-tokens", "5", "--repeats", "1",
                       "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["batch"] == 3 and report["identical_rows"] == 3
    assert report["answer_tokens"] == 15 and report["answers_at_cap"] == 3  # no EOS: 5 each
    assert set(report["answer_tokens_per_s"]) == {"generate", "greedy_answers"}
    assert all(len(s) == 1 and s[0] > 0 for s in report["seconds"].values())


def test_committed_reports_are_strict_json():
    """Every committed report parses without NaN or Infinity, which strict JSON readers refuse."""
    from pathlib import Path

    def refuse(constant):
        raise ValueError(f"{constant} in a committed report")

    reports = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.json"))
    assert reports
    for path in reports:
        json.loads(path.read_text(), parse_constant=refuse)
