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


COMPACT_SHARE = 0.125
"""`greedy_answers` drops finished rows from the batch (and their keys and values from the
cache) once at least this share of the rows still running has finished."""


def eos_ids(model) -> set[int]:
    """The model's end-of-sequence token ids."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch: (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.inference_mode()
def greedy_answers(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
                   ) -> list[list[int]]:
    """Greedy answers to a left-padded batch of prompts, each cut after its first end-of-sequence
    token: the tokens transformers' greedy `generate` gives, about twice as fast on CPU.

    Two costs of `generate` are avoided. Its prefill hands the LM head the last position of
    every row, a strided view, for which torch's matmul copies the head's weight once per row
    (96 x 576 x 49152 for a batch of 96): the head is fed a contiguous input here. And it runs
    every row to the longest answer; here rows that have finished leave the batch, with their
    cached keys and values, once COMPACT_SHARE of the rows still running are done (half of the
    corpus's answers stop before the 160-token cap). Measured in BENCHMARKS, session 39.
    """
    from transformers import DynamicCache

    eos = eos_ids(model)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, inputs: (inputs[0].contiguous(), *inputs[1:]))
    try:
        ids, mask = ids.to(model.device), mask.to(model.device)
        cache = DynamicCache(config=model.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        answers: list[list[int]] = [[] for _ in range(len(ids))]
        rows = list(range(len(ids)))  # the batch's row r is prompt rows[r]
        position = positions[:, -1]
        for step in range(max_new_tokens):
            tokens = logits[:, -1].max(-1).indices
            finished = []
            for r, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                if answers[row] and answers[row][-1] in eos:
                    finished.append(r)  # finished before this step; its token is not kept
                    continue
                answers[row].append(token)
                if token in eos:
                    finished.append(r)
            if step == max_new_tokens - 1 or len(finished) == len(rows):
                break
            if len(finished) >= COMPACT_SHARE * len(rows):
                gone = set(finished)
                keep = [r for r in range(len(rows)) if r not in gone]
                index = torch.tensor(keep, device=tokens.device)
                cache.batch_select_indices(index)
                rows = [rows[r] for r in keep]
                tokens, mask, position = tokens[index], mask[index], position[index]
            position = position + 1
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask,
                           position_ids=position[:, None], past_key_values=cache,
                           use_cache=True).logits
        return answers
    finally:
        hook.remove()


def answer_batch(model, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int
                 ) -> list[Sample]:
    """The base model's greedy answers to a batch of instructions (left-padded, one batch); a
    prompt is a user turn, or a conversation (chat messages ending with the user turn).
    """
    from m2r2core.runtime.prompt import encode, encode_messages

    encoded = [encode(tokenizer, p) if isinstance(p, str) else encode_messages(tokenizer, p)
               for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = greedy_answers(model, *left_padded(encoded, pad), max_new_tokens)
    return [Sample(prompt_ids + answer, len(prompt_ids), "chat")
            for prompt_ids, answer in zip(encoded, answers, strict=True)]


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
