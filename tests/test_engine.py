"""The shared engine is safe for concurrent sessions and reports its runs honestly."""

import threading

from m2r2core.config import DecodeConfig, SamplingConfig


def test_concurrent_sessions_get_their_own_results(tiny_engine):
    prompts = ["One", "Two words", "Three words here", "And a fourth"]
    cfg = DecodeConfig(max_new_tokens=10, sampling=SamplingConfig(temperature=0.8, seed=5))
    expected = {p: tiny_engine.run(p, cfg).trace.token_ids for p in prompts}
    got = {}

    def worker(prompt):
        got[prompt] = tiny_engine.run(prompt, cfg).trace.token_ids

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == expected


def test_stream_yields_records_as_they_happen(tiny_engine):
    generation = tiny_engine.generate("Stream me", DecodeConfig(max_new_tokens=5))
    seen = []
    for step in generation:
        seen.append(step.position)
        assert len(generation.steps) == len(seen)
    assert seen == [0, 1, 2, 3, 4]
    trace = generation.result.trace
    assert trace.stop_reason == "max_new_tokens"
    assert trace.prefill_ms > 0 and trace.decode_ms > 0
    assert all(s.latency_ms >= s.forward_ms > 0 for s in trace.steps)
    assert trace.config["max_new_tokens"] == 5 and trace.model["fingerprint"]


def test_eos_stops_generation(tiny_engine, monkeypatch):
    first = tiny_engine.run("Stop early", DecodeConfig(max_new_tokens=6)).trace.token_ids
    monkeypatch.setattr(tiny_engine, "eos_ids", frozenset({first[2]}))
    trace = tiny_engine.run("Stop early", DecodeConfig(max_new_tokens=6)).trace
    assert trace.token_ids == first[:first.index(first[2]) + 1]
    assert trace.stop_reason == "eos"
