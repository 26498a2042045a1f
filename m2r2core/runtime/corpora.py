"""The shipped Wikipedia lead sections, split by a hash of the title (one in ten held out: never
trained on), and the instruction templates written from them.
"""

from __future__ import annotations

import hashlib
import json

from m2r2core.errors import AssetMissing
from m2r2core.runtime import assets

TEMPLATES = (
    "What is {title}? Answer in a few sentences.",
    "Explain {title} to a high-school student.",
    "Write a short paragraph about {title}.",
    "List three facts about {title}.",
    "Why might someone be interested in {title}?",
    "Summarize the following text in two sentences.\n\n{extract}",
    "Write a question about {title} and answer it.",
    "Describe {title} ({description}) in simple words.",
)


def is_held_out(title: str) -> bool:
    """Whether a Wikipedia article belongs to the held-out tenth (never trained on)."""
    return hashlib.sha256(title.encode()).digest()[0] % 10 == 0


def wiki_articles(split: str) -> list[dict]:
    """The shipped Wikipedia lead sections of one split: 'train' or 'heldout'."""
    path = assets.verify(assets.WIKI_SUMMARIES)
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AssetMissing(f"{path} is not valid JSON ({err}).") from err
    held = split == "heldout"
    rows = list(rows.values()) if isinstance(rows, dict) else rows  # keyed by title
    return [r for r in rows if r.get("extract") and is_held_out(r["title"]) == held]

