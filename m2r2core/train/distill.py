"""Self-distillation data for the accelerator adapters and routers, kept apart from every
evaluation set: instructions written from the shipped Wikipedia titles and texts, answered by the
base model itself (greedy), plus plain Wikipedia text.

Wikipedia articles are split by a hash of their title: one in ten is held out (perplexity and
router validation), the rest may be used for training. MT-Bench and AlpacaEval prompts are never
read here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from m2r2core.errors import AssetMissing
from m2r2core.runtime.corpora import TEMPLATES, is_held_out, wiki_articles  # noqa: F401


@dataclass(frozen=True)
class Sample:
    """One training sequence: token ids, and where the model's own answer starts (0 for text)."""

    ids: list[int]
    answer_start: int
    kind: str
    """'chat' (instruction + the base model's greedy answer) or 'text' (plain Wikipedia)."""
    source: str = ""
    """Where a corpus sample's instruction or text came from ('sharegpt', 'sharegpt-followup',
    'sharegpt-turn', 'wiki', 'text'); empty for samples of an old-style JSONL corpus."""


def instructions(articles: list[dict], count: int, seed: int) -> list[str]:
    """`count` instructions, each from a different article and a seeded template."""
    rng = random.Random(seed)
    chosen = rng.sample(articles, min(count, len(articles)))
    out = []
    for row in chosen:
        out.append(written(rng.choice(TEMPLATES), row))
    return out


def written(template: str, article: dict) -> str:
    """The instruction one template writes from one article."""
    return template.format(title=article["title"], extract=article["extract"][:700],
                           description=article.get("description") or "a topic")


@torch.inference_mode()
def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int
                    ) -> torch.Tensor:
    """Greedy `generate` of transformers on a left-padded batch, with the LM head fed a contiguous
    input: generate's prefill hands the head the last position of every row, a strided view, and
    torch's matmul then copies the head's weight once per row (96 x 576 x 49152 for a batch of
    96). Contiguous, it is one product: answering at batch 96 runs 1.4x faster (BENCHMARKS,
    session 39).
    """
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, inputs: (inputs[0].contiguous(), *inputs[1:]))
    try:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad)
    finally:
        hook.remove()


def answer_batch(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int
                 ) -> list[Sample]:
    """The base model's greedy answers to a batch of instructions (left-padded, one call); a
    prompt is a user turn, or a conversation (chat messages ending with the user turn).
    """
    from m2r2core.runtime.prompt import encode, encode_messages

    encoded = [encode(tokenizer, p) if isinstance(p, str) else encode_messages(tokenizer, p)
               for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    out = greedy_generate(model, ids, mask, max_new_tokens, pad)
    samples = []
    eos = set(model.generation_config.eos_token_id
              if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    for prompt_ids, row in zip(encoded, out[:, width:].tolist(), strict=True):
        answer = []
        for token in row:
            answer.append(token)
            if token in eos:
                break
        samples.append(Sample(prompt_ids + answer, len(prompt_ids), "chat"))
    return samples


def text_samples(tokenizer, articles: list[dict], count: int, max_tokens: int, seed: int
                 ) -> list[Sample]:
    """Plain Wikipedia lead sections, truncated to max_tokens."""
    rng = random.Random(seed + 1)
    chosen = rng.sample(articles, min(count, len(articles)))
    return [Sample(tokenizer(r["extract"])["input_ids"][:max_tokens], 0, "text")
            for r in chosen]


def build(model, tokenizer, n_chat: int, n_text: int, max_new_tokens: int, max_tokens: int,
          seed: int, batch_size: int = 32, progress: Callable[[int, int], None] | None = None
          ) -> list[Sample]:
    """The whole corpus: n_chat distilled answers then n_text plain texts."""
    articles = wiki_articles("train")
    prompts = instructions(articles, n_chat, seed)
    samples: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        samples += answer_batch(model, tokenizer, prompts[start:start + batch_size],
                                max_new_tokens)
        if progress:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    samples = [Sample(s.ids[:max_tokens], s.answer_start, s.kind) for s in samples]
    return samples + text_samples(tokenizer, articles, n_text, max_tokens, seed)


def save(samples: list[Sample], path: Path) -> None:
    """Write samples as JSONL (temp file, then rename)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for s in samples:
            handle.write(json.dumps({"ids": s.ids, "answer_start": s.answer_start,
                                     "kind": s.kind}) + "\n")
    tmp.replace(path)


def load(path: Path) -> list[Sample]:
    """Read samples written by `save`; AssetMissing if absent, empty or corrupt."""
    if not path.is_file():
        raise AssetMissing(f"No training data at {path}; build it with "
                           "`python -m m2r2core.train data`.")
    try:
        samples = [Sample(**json.loads(line)) for line in path.read_text().splitlines() if line]
    except (json.JSONDecodeError, TypeError) as err:
        raise AssetMissing(f"The training data {path} is corrupt ({err}); rebuild it.") from err
    samples = [s for s in samples if len(s.ids) >= 2]
    if not samples:
        raise AssetMissing(f"The training data {path} holds no usable sequence; rebuild it.")
    return samples
