"""Reproducibility bundles (analysis/bundle.py): every kind of run survives the JSON round trip
field for field, and every bad bundle is refused with a message that says why."""

import dataclasses
import json
import re

import pytest
import torch

from analysis import bundle, compare
from analysis.bundle import BundleError
from m2r2core.config import DecodeConfig, EngineConfig
from m2r2core.engine import Engine
from m2r2core.exits.early_exit import ExitConfig
from m2r2core.exits.routers import ExitRule
from m2r2core.moe.offload import OffloadConfig, OffloadEngine
from m2r2core.spec.speculative import SpecConfig
from m2r2core.trace import SCHEMA_VERSION

PROMPT = "The capital of France is"
CFG = DecodeConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def exit_run(tiny_engine):
    rule = ExitConfig(ExitRule("confidence", "slow", 0.3, 2))
    return compare.compare_exit(tiny_engine, PROMPT, CFG, rule)


@pytest.fixture(scope="module")
def owner(tiny_engine):
    return bundle.owner_of(tiny_engine)


def _round_trip(kind, record, owner, settings=None):
    text = bundle.dumps(kind, record, owner, PROMPT, settings or {"view": {"k": 1}})
    return bundle.loads(text.encode(), kind, owner)


def test_exit_comparison_round_trips(exit_run, owner):
    opened = _round_trip("exit", exit_run, owner)
    back = opened.record
    assert back.rule == exit_run.rule
    assert back.exit_steps == exit_run.exit_steps
    assert back.traced.trace == exit_run.traced.trace
    assert (back.exit_ms, back.plain_ms, back.exit_text) == (exit_run.exit_ms,
                                                             exit_run.plain_ms,
                                                             exit_run.exit_text)
    assert opened.prompt == PROMPT and opened.settings == {"view": {"k": 1}}
    assert opened.environment["torch"] == torch.__version__


def test_a_kept_record_text_makes_the_same_bundle_with_new_settings(exit_run, owner):
    # pages write the record's text once and only the envelope again when a setting changes
    text = bundle.record_json("exit", exit_run)
    fresh = json.loads(bundle.dumps("exit", exit_run, owner, PROMPT, {"view": {"k": 2}}))
    reused = json.loads(bundle.dumps("exit", exit_run, owner, PROMPT, {"view": {"k": 2}},
                                     record_text=text))
    assert list(reused)[-1] == "record" and reused["settings"] == {"view": {"k": 2}}
    opened = bundle.loads(json.dumps(reused).encode(), "exit", owner)
    fresh.pop("created"), reused.pop("created")
    assert reused == fresh
    assert opened.record.exit_steps == exit_run.exit_steps


def test_spec_comparison_round_trips(tiny_engine, owner):
    run = compare.compare_spec(tiny_engine, PROMPT, CFG, SpecConfig(stream="slow", draft_layer=1),
                               sampling=False)
    back = _round_trip("spec", run, owner).record
    assert back == run and back.prompt == PROMPT and back.decode["max_new_tokens"] == 8


def test_trace_round_trips(tiny_run, owner):
    back = _round_trip("trace", tiny_run.trace, owner).record
    assert back == tiny_run.trace


def test_expert_comparison_round_trips(tiny_model_dirs, tmp_path):
    engine = Engine.load(EngineConfig(model=str(tiny_model_dirs["mixtral"]), dtype="float32"))
    moe = OffloadEngine(engine, store=tmp_path / "store")
    run = compare.compare_experts(moe, PROMPT, DecodeConfig(max_new_tokens=4, trace=False),
                                  OffloadConfig(capacity=4, bandwidth="pcie4", predictor="pregate"))
    back = _round_trip("experts", run, bundle.owner_of(moe)).record
    assert back == run and back.events and back.routes


def test_wrong_kind_names_the_page_that_opens_it(exit_run, owner):
    text = bundle.dumps("exit", exit_run, owner, PROMPT, {})
    with pytest.raises(BundleError, match="Exit Threshold debugger"):
        bundle.loads(text, "spec", owner)


def test_other_model_or_trained_files_are_refused_naming_both(exit_run, owner):
    text = bundle.dumps("exit", exit_run, owner, PROMPT, {})
    other_model = dataclasses.replace(owner, model_name="other-model",
                                      model_fingerprint="f" * 16)
    with pytest.raises(BundleError, match=re.escape(owner.model_name) + ".*other-model"):
        bundle.loads(text, "exit", other_model)
    other_files = dataclasses.replace(owner, trained="0123456789abcdef", trained_label="run-7")
    with pytest.raises(BundleError, match="other trained files.*run-7"):
        bundle.loads(text, "exit", other_files)


@pytest.mark.parametrize("damage, needle", [
    (lambda t: t[: len(t) // 2], "not valid JSON"),
    (lambda t: "[1, 2]", "not an M2R2 Studio bundle"),
    (lambda t: t.replace('"version": 1', '"version": 99'), "format version 99"),
    (lambda t: t.replace('"exit_steps"', '"exit_stepz"'), "damaged"),
    (lambda t: t.replace('"token_id"', '"token_idx"', 1), "damaged"),
])
def test_damaged_bundles_are_refused_clearly(exit_run, owner, damage, needle):
    text = damage(bundle.dumps("exit", exit_run, owner, PROMPT, {}))
    with pytest.raises(BundleError, match=needle):
        bundle.loads(text, "exit", owner)


def test_oversized_file_is_refused_before_parsing(owner):
    with pytest.raises(BundleError, match="at most"):
        bundle.loads(b" " * (bundle.MAX_BYTES + 1), "exit", owner)


def test_bundle_is_recognised_and_a_bare_trace_is_not(tiny_run, owner):
    assert bundle.is_bundle(bundle.dumps("trace", tiny_run.trace, owner, PROMPT, {}))
    assert not bundle.is_bundle(tiny_run.trace.to_json())
    assert not bundle.is_bundle(b"\xff\xfe")
    assert json.loads(tiny_run.trace.to_json())["schema_version"] == SCHEMA_VERSION
