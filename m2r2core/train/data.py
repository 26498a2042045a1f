"""Training data for the stream's learned parts: the splits of the distillation corpus, and
batches cut from them (padded to a fixed length, or bucketed by length so a batch is padded only
to its own longest row).
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable, Iterator

import torch

from m2r2core.errors import M2R2Error
from m2r2core.train import distill

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(ids (B, T), lengths (B,), answer starts (B,)): the position that produces the first answer
token is answer_start - 1."""


def pad_rows(chunk: list[distill.Sample], width: int) -> Batch:
    """The samples cut or padded (with their last token) to `width`, as one batch."""
    rows, lengths, starts = [], [], []
    for s in chunk:
        ids = s.ids[:width]
        rows.append(ids + [ids[-1]] * (width - len(ids)))
        lengths.append(len(ids))
        starts.append(max(0, min(s.answer_start - 1, width - 1)))
    return torch.tensor(rows), torch.tensor(lengths), torch.tensor(starts)


def batches(samples: list[distill.Sample], batch_size: int, seq_len: int, seed: int
            ) -> Iterator[Batch]:
    """Endless seeded batches of batch_size rows, every row padded to seq_len ('padded')."""
    rng = random.Random(seed)
    usable = [s for s in samples if len(s.ids) >= 16]
    while True:
        rng.shuffle(usable)
        for start in range(0, len(usable) - batch_size + 1, batch_size):
            yield pad_rows(usable[start:start + batch_size], seq_len)


def length_chunks(samples: list[distill.Sample], batch_tokens: int, seq_len: int,
                  multiple: int = 16) -> list[list[distill.Sample]]:
    """The samples sorted by length and cut into chunks of about batch_tokens tokens, each
    counted at its longest row (rounded up to `multiple`, at most seq_len).
    """
    chunks: list[list[distill.Sample]] = [[]]
    for s in sorted(samples, key=lambda s: len(s.ids)):
        width = min(seq_len, -(-min(len(s.ids), seq_len) // multiple) * multiple)
        if chunks[-1] and (len(chunks[-1]) + 1) * width > batch_tokens:
            chunks.append([])
        chunks[-1].append(s)
    return [c for c in chunks if c]


HEAD_BATCH_TOKENS = 4096
"""Tokens per batch of the frozen model's pass for the Medusa heads (head_data)."""


@torch.inference_mode()
def head_data(model, samples: list[distill.Sample], seq_len: int,
              progress: Callable[[int, int], None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the frozen model over the samples once, in length chunks padded on the right (causal:
    the real positions never see the padding).

    Returns:
        (P, H) final normalised states, (P,) the model's greedy next token at each position,
        (P,) each position's index inside its sample's row (P = all positions of all samples,
        concatenated in the samples' order; a row boundary is where the index restarts at 0),
        and (P,) whether the position is in the answer (from the one that chooses its first
        token) or in plain text.
    """
    # Every output is allocated once, at its final size: many small per-sample tensors kept
    # between the pass's large temporary ones fragmented the heap (RSS grew about 10 MB per
    # sample on 2,961 samples).
    lengths = [min(len(s.ids), seq_len) for s in samples]
    offsets: dict[int, list[int]] = {}  # a sample listed twice fills both of its places
    for sample, start in zip(samples, itertools.accumulate([0] + lengths), strict=False):
        offsets.setdefault(id(sample), []).append(start)
    total = sum(lengths)
    states = torch.empty(total, model.config.hidden_size, dtype=model.dtype)
    greedy = torch.empty(total, dtype=torch.long)
    index = torch.cat([torch.arange(n) for n in lengths]) if samples else torch.empty(0).long()
    answer = torch.empty(total, dtype=torch.bool)
    done = 0
    unique = list({id(s): s for s in samples}.values())
    for chunk in length_chunks(unique, HEAD_BATCH_TOKENS, seq_len):
        ids, rows_n, _ = pad_rows(chunk, min(seq_len, max(len(s.ids) for s in chunk)))
        normed = model.model(input_ids=ids).last_hidden_state  # (B, T, H), after the final norm
        for row, (sample, n) in enumerate(zip(chunk, rows_n.tolist(), strict=True)):
            tokens = model.lm_head(normed[row, :n]).argmax(-1)
            for start in offsets[id(sample)]:
                states[start:start + n] = normed[row, :n]
                greedy[start:start + n] = tokens
                answer[start:start + n] = index[start:start + n] >= sample.answer_start - 1
        done += len(chunk)
        if progress:
            progress(done, len(unique))
    return states, greedy, index, answer


def bucketed_batches(samples: list[distill.Sample], batch_tokens: int, seq_len: int, seed: int
                     ) -> Iterator[Batch]:
    """Endless seeded batches of rows of similar length ('bucketed'), each padded only to its
    own longest row and holding about batch_tokens tokens; each epoch reshuffles the samples
    (ties in length) and the order of the batches.
    """
    rng = random.Random(seed)
    usable = [s for s in samples if len(s.ids) >= 16]
    while True:
        rng.shuffle(usable)
        chunks = length_chunks(usable, batch_tokens, seq_len)
        rng.shuffle(chunks)
        for chunk in chunks:
            yield pad_rows(chunk, min(seq_len, max(len(s.ids) for s in chunk)))


def fresh_mix(folder, first: list[distill.Sample], grown: list[distill.Sample], share: float,
              seed: int, rounds: str = "growth rounds", older: str = "the first build"
              ) -> tuple[list[distill.Sample], str]:
    """The train answers with the growth rounds' as `share` of them: every growth answer
    (`grown`), and a seeded sample of the older ones (`first`: the first build's, and any
    growth round not counted as fresh) for the rest (share 1: the growth answers alone).

    A continuation on fresh data: a second pass over the first build's answers bought nothing
    on held-out answers (BENCHMARKS, session 28), so a run after a growth round can put its
    steps where the data is new while keeping some of the old answers in the mix.
    """
    if not 0 < share <= 1:
        raise M2R2Error(f"--fresh-share must be above 0 and at most 1 (got {share}).")
    if not grown:
        raise M2R2Error(f"--fresh-share needs a growth round's answers; the corpus in {folder} "
                        "has none yet (build one: `python -m m2r2core.train corpus --grow N`).")
    keep = min(len(first), round(len(grown) * (1 - share) / share))
    old = random.Random(seed).sample(first, keep)
    return grown + old, (f" ({len(grown)} from {rounds}, {keep} from {older}: "
                         f"--fresh-share {share:g})")


def datasets(args: argparse.Namespace, fingerprint: str) -> tuple[dict, str]:
    """{'train', 'router', 'dev', 'test'} samples and a description of where they came from.

    The distillation corpus (--corpus, default work_dir/corpus when built) gives the train
    split (every tenth chat answer kept out of it for the routers, which must learn the fast
    stream's errors on answers the adapters never saw), dev and test. An old-style JSONL corpus
    (--data) gives nine tenths to train and the tenth as router, dev and test at once.
    """
    from m2r2core.train import corpus
    from m2r2core.train.common import router_split, train_split, work_dir

    folder = getattr(args, "corpus", None) or work_dir(args.model) / "corpus"
    if args.data is None and (folder / "manifest.json").is_file():
        splits = {split: corpus.load(folder, split, with_text=False,
                                     model_fingerprint=fingerprint)
                  for split in ("dev", "test")}
        first = corpus.finished(folder, "train", growth=False)
        rounds = corpus.growth_rounds(folder, "train")
        chat = first + [s for samples in rounds.values() for s in samples]  # as finished reads
        origin = [0] * len(first) + [r for r, samples in rounds.items() for _ in samples]
        text = [s for s in corpus.text_samples(folder) if len(s.ids) >= 2]
        if not chat and not text:
            raise corpus.CorpusError(f"The corpus in {folder} has no finished train samples "
                                     "yet.")
        answers, fresh_note = train_split(chat), ""
        fresh, chosen = getattr(args, "fresh_share", None), getattr(args, "fresh_rounds", None)
        if fresh is None and chosen:
            raise M2R2Error("--fresh-rounds says which growth rounds --fresh-share counts as "
                            "fresh; give --fresh-share too.")
        if fresh is not None:
            wanted = chosen or sorted(rounds)
            unknown = sorted(set(wanted) - set(rounds))
            if unknown and rounds:
                raise M2R2Error(f"--fresh-rounds {' '.join(map(str, unknown))}: the corpus in "
                                f"{folder} has growth rounds {', '.join(map(str, rounds))}.")
            is_new = [o in wanted for o in train_split(origin)]
            labels = (("growth rounds", "the first build") if chosen is None else
                      ("growth round" + "s" * (len(wanted) > 1) + " "
                       + ", ".join(map(str, sorted(wanted))), "the first build and older rounds"))
            answers, fresh_note = fresh_mix(
                folder, [a for a, n in zip(answers, is_new, strict=True) if not n],
                [a for a, n in zip(answers, is_new, strict=True) if n], fresh, args.seed,
                *labels)
        share = getattr(args, "text_share", None)
        if answers and share is not None and 0 <= share < 1:  # text as this share of rows
            keep = min(len(text), round(len(answers) * share / (1 - share)))
            text = random.Random(args.seed).sample(text, keep)
        note = "" if answers else ", the train answers not built yet: text only"
        return (splits | {"train": answers + text, "router": router_split(chat)},
                f"corpus {folder.name} (train/dev/test splits; {len(answers)} answers"
                f"{fresh_note}, {len(text)} text windows{note})")
    path = args.data or work_dir(args.model) / "corpus.jsonl"
    samples = distill.load(path)
    held = router_split(samples)
    return ({"train": train_split(samples), "router": held, "dev": held, "test": held},
            path.name)
