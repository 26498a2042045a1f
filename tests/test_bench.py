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
