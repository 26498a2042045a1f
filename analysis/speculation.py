"""Statistics of self-speculative runs, from their SpecRound records (no model needed)."""

from __future__ import annotations

from m2r2core.trace import SpecRound


def acceptance(rounds: list[SpecRound], max_draft: int) -> dict:
    """Verification statistics of one run (the prefill round excluded).

    `accepted_by_position[i] / reached_by_position[i]` is the acceptance rate of the i-th draft
    of a chain, counted over the chains that drafted that far.
    """
    verified = [r for r in rounds if r.index > 0]
    reached = [0] * max_draft
    passed = [0] * max_draft
    for r in verified:
        for i in range(min(len(r.drafts), max_draft)):
            reached[i] += 1
            passed[i] += i < r.accepted
    count = len(verified)
    return {
        "verifications": count,
        "drafted": sum(len(r.drafts) for r in verified),
        "accepted": sum(r.accepted for r in verified),
        "tokens_per_verification": sum(len(r.emitted) for r in verified) / count if count else 0.0,
        "mean_accepted": sum(r.accepted for r in verified) / count if count else 0.0,
        "accepted_lengths": [r.accepted for r in verified],
        "reached_by_position": reached,
        "accepted_by_position": passed,
        "acceptance_by_position": [p / n if n else None for p, n in zip(passed, reached,
                                                                          strict=True)],
        "draft_depths": [d for r in verified for d in r.draft_depths],
        "draft_ms": sum(r.draft_ms for r in verified),
        "verify_ms": sum(r.verify_ms for r in verified),
    }


def running_rate(rounds: list[SpecRound]) -> list[tuple[int, float]]:
    """(tokens so far, tokens/s so far) after each verification round, prefill excluded."""
    tokens, ms, out = 0, 0.0, []
    for r in rounds:
        if r.index == 0:
            continue
        tokens += len(r.emitted)
        ms += r.draft_ms + r.verify_ms
        out.append((tokens, tokens / (ms / 1000.0) if ms else 0.0))
    return out


def plain_running_rate(latencies_ms: list[float]) -> list[tuple[int, float]]:
    """(tokens so far, tokens/s so far) of plain decoding from its per-token latencies."""
    out, ms = [], 0.0
    for count, latency in enumerate(latencies_ms, 1):
        ms += latency
        out.append((count, count / (ms / 1000.0) if ms else 0.0))
    return out


def round_rows(rounds: list[SpecRound]) -> list[dict]:
    """One flat row per round, for tables and CSV downloads."""
    return [{
        "round": r.index, "position": r.position, "drafts": "|".join(r.draft_texts),
        "drafted": len(r.drafts), "draft_depths": "|".join(map(str, r.draft_depths)),
        "accepted": r.accepted, "emitted": "|".join(r.emitted_texts),
        "own_token": ("correction" if r.correction else "bonus") if r.index else "prefill",
        "draft_ms": round(r.draft_ms, 3), "verify_ms": round(r.verify_ms, 3),
    } for r in rounds]


def token_kinds(rounds: list[SpecRound]) -> list[dict]:
    """How each emitted token of a run came to be, in order: 'prefill', 'accepted' (a draft the
    model kept), 'correction' (the model's own token where it refused a draft) or 'bonus' (its
    own token after every draft passed); with the round, the draft it was (or replaced) and that
    draft's probability, and the draft depth.
    """
    out = []
    for r in rounds:
        for i, (token, text) in enumerate(zip(r.emitted, r.emitted_texts)):
            kind = ("prefill" if r.index == 0 else "accepted" if i < r.accepted
                    else "correction" if r.correction else "bonus")
            drafted = i < len(r.drafts)
            out.append({
                "position": r.position + i, "token": token, "text": text, "kind": kind,
                "round": r.index, "draft": r.drafts[i] if drafted else None,
                "draft_text": r.draft_texts[i] if drafted else None,
                "draft_prob": r.draft_probs[i] if drafted else None,
                "draft_depth": r.draft_depths[i] if i < len(r.draft_depths) else None,
            })
    return out


def first_divergence(a: list[SpecRound], b: list[SpecRound]) -> dict | None:
    """Where two speculative runs of one prompt first part ways, and why.

    They part at the first position whose token differs (only sampling, or a bf16 near-tie,
    can make greedy runs differ) or, with equal tokens, whose kind differs (one kept a draft
    where the other corrected one or had not drafted that far). None when every shared
    position agrees. The why is each run's draft there, its probability under the draft
    distribution, and what the model did with it.
    """
    kinds_a, kinds_b = token_kinds(a), token_kinds(b)
    for x, y in zip(kinds_a, kinds_b, strict=False):
        if x["token"] != y["token"] or x["kind"] != y["kind"]:
            return {"position": x["position"], "a": x, "b": y,
                    "reason": "different tokens" if x["token"] != y["token"]
                    else "different fates of the same token"}
    return None


def kind_differences(a: list[SpecRound], b: list[SpecRound]) -> set[int]:
    """Positions where the two runs emitted a different token or the same token differently."""
    return {x["position"] for x, y in zip(token_kinds(a), token_kinds(b), strict=False)
            if x["token"] != y["token"] or x["kind"] != y["kind"]}
