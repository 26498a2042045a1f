"""Real prompt sets, read from the packaged files: MT-Bench first turns, the AlpacaEval slices
(Koala, Self-Instruct, Vicuna, ...), or any JSONL file with a `prompt` field (MT-Bench's `turns`
format is accepted too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m2r2core.errors import AssetMissing
from m2r2core.runtime import assets

ALPACA_SLICES = ("koala", "selfinstruct", "vicuna", "oasst", "helpful_base")
NAMED_SETS = ("mt-bench",) + ALPACA_SLICES


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt."""

    id: str
    category: str
    text: str
    reference: str = ""
    """A reference answer where the set ships one (AlpacaEval: GPT-4; MT-Bench: GPT-4 for the
    30 questions with references), else empty."""


def load_prompts(name_or_path: str, limit: int | None = None) -> tuple[Prompt, ...]:
    """Load a named set or a JSONL file; `limit` keeps the first prompts."""
    if name_or_path == "mt-bench":
        path = assets.locate(assets.MT_BENCH_QUESTIONS)
        refs = _mt_bench_references(path.parent / "reference_answer" / "gpt-4.jsonl")
        prompts = tuple(Prompt(p.id, p.category, p.text, refs.get(p.id, ""))
                        for p in _jsonl(path))
    elif name_or_path in ALPACA_SLICES:
        prompts = _alpaca(assets.locate(assets.ALPACA_EVAL), name_or_path)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise AssetMissing(
                f"No prompt set '{name_or_path}': give one of {', '.join(NAMED_SETS)} or a "
                "JSONL file with a 'prompt' field per line."
            )
        prompts = _jsonl(path)
    return prompts[:limit] if limit else prompts


def _jsonl(path: Path) -> tuple[Prompt, ...]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["prompt"] if "prompt" in row else row["turns"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise AssetMissing(f"{path}:{number} is not a JSON object with a 'prompt' "
                               f"(or MT-Bench 'turns') field: {exc}") from exc
        prompts.append(Prompt(str(row.get("question_id", row.get("id", number))),
                              str(row.get("category", "")), text,
                              str(row.get("reference", "") or "")))
    return tuple(prompts)


def _alpaca(path: Path, slice_name: str) -> tuple[Prompt, ...]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return tuple(Prompt(f"{slice_name}-{i}", slice_name, row["instruction"],
                        row.get("output", "") or "")
                 for i, row in enumerate(r for r in rows if r.get("dataset") == slice_name))


def _mt_bench_references(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    refs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            refs[str(row["question_id"])] = row["choices"][0]["turns"][0]
    return refs


def select_prompts(args) -> tuple[Prompt, ...]:
    """The prompt set of a benchmark command line (`prompts`, `limit`, `per_category`), limited
    overall or per category.
    """
    prompts = load_prompts(args.prompts)
    if args.per_category:
        seen: dict[str, int] = {}
        kept = []
        for prompt in prompts:
            if seen.get(prompt.category, 0) < args.per_category:
                seen[prompt.category] = seen.get(prompt.category, 0) + 1
                kept.append(prompt)
        prompts = tuple(kept)
    return prompts[:args.limit] if args.limit else prompts
