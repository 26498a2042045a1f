"""The MoE's route accelerator: the rate accelerator the m2r2 expert predictor reads, trained
on the MoE's own states (Wikipedia text and the MoE's own answers), with its held-out recall
against the pre-gate baseline. `python -m m2r2core.train.moe fit-accel` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pickle
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from m2r2core.config import EngineConfig
from m2r2core.moe.moefy import _run_hooked, build, files_digest, fitting_sequences
from m2r2core.moe.prefetch import margin_kept
from m2r2core.runtime.model import DEFAULT_MODEL, load
from m2r2core.train import distill
from m2r2core.train.common import labelled_bars


def moe_states(model, sequences: Iterable[list[int]], dtype: torch.dtype = torch.float32
               ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per layer: the block outputs h_l (T, H, kept in `dtype`) and the experts the MoE used
    (T, k; None for a dense layer), over the token sequences.
    """
    layers = model.model.layers
    states: list[list[torch.Tensor]] = [[] for _ in layers]
    used: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(
            lambda _m, _inp, out, i=i: states[i].append(
                (out[0] if isinstance(out, tuple) else out)[0].detach().to(dtype))))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda _m, _inp, out, i=i: used[i].append(out[2].detach())))
    _run_hooked(model, sequences, hooks)
    return [torch.cat(s) for s in states], [torch.cat(u) if u else None for u in used]


def own_answers(model, tokenizer, articles: list[dict], count: int, max_new_tokens: int,
                seed: int, progress=None) -> list:
    """The MoE's own greedy answers to `count` instructions written from `articles`, in the chat
    template: the text it reads while decoding, which teacher-forced Wikipedia is not.
    """
    prompts = distill.instructions(articles, count, seed)
    samples = []
    for start in range(0, len(prompts), 8):
        samples += distill.answer_batch(model, tokenizer, prompts[start:start + 8],
                                        max_new_tokens)
        if progress:
            progress(len(samples), len(prompts))
    return samples


@torch.inference_mode()
def _state_recall(moe, states: list[torch.Tensor], used: list[torch.Tensor | None], fast,
                  distance: int, width: int, gap: float | None = None) -> tuple[float, float]:
    """Share of the experts layer l+d used that its router picks (top `width`) from the state
    after block l, accelerated by `fast` when given; and how many experts beyond the top-k it
    names per layer and token. `gap` gates those as the predictor does (prefetch.MARGIN_GAP).
    """
    hits = total = extra = rows = 0
    for layer in range(moe.n_layers - distance):
        target = layer + distance
        if not moe.is_moe(target):
            continue
        x = states[layer] if fast is None else fast(layer, states[layer], distance)
        logits = moe.logits(target, x).float()
        best = logits.topk(width, -1)
        named = (torch.ones_like(best.indices, dtype=torch.bool) if gap is None
                 else margin_kept(logits, best.values, moe.top_k, gap))
        hit = (best.indices[:, :, None] == used[target][:, None, :]).any(-1) & named
        hits += int(hit.sum())
        total += used[target].numel()
        extra += int(named[:, moe.top_k:].sum())
        rows += named.shape[0]
    return hits / total, extra / rows


def cmd_fit_accel(args: argparse.Namespace) -> None:
    """Train the MoE model's rate accelerator for the m2r2 predictor; report held-out recall."""
    from m2r2core.moe import prefetch
    from m2r2core.runtime.model import fingerprint

    torch.set_num_threads(args.threads)
    folder = build(Path(args.trained), progress=labelled_bars())
    loaded = load(EngineConfig(model=str(folder), dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = model.model.layers
    moe = prefetch.MoeParts(tuple(layer.mlp.gate.weight.float() if hasattr(layer.mlp, "gate")
                                  else None for layer in layers),
                            tuple(layer.post_attention_layernorm for layer in layers),
                            model.config.num_experts_per_tok,
                            getattr(model.config, "num_local_experts", None)
                            or model.config.num_experts)
    start = time.perf_counter()

    def text(split: str, n_tokens: int) -> Iterator[list[int]]:
        return fitting_sequences(tokenizer, distill.wiki_articles(split), n_tokens, 256,
                                 args.seed)

    bar = labelled_bars()
    held = _held_states(args, model, tokenizer, text)
    if args.measure_only:  # the committed accelerator, measured again
        accel, old = prefetch.load_route_accelerator(Path(args.trained), fingerprint(model))
        _report(args, moe, held, accel, old.tokens, old.metrics.get("fit_seconds"), model)
        return
    states, used = _train_states(args, model, tokenizer, text, bar)
    with torch.enable_grad():
        accel = prefetch.fit_accelerator(moe, states, used, args.rank, args.lookahead,
                                         args.steps, args.seed,
                                         lambda d, t: bar("accelerator", d, t),
                                         per_distance=not args.shared,
                                         batch_tokens=args.batch_tokens, lr=args.lr,
                                         loss=args.loss)
    _report(args, moe, held, accel, int(states[0].shape[0]),
            round(time.perf_counter() - start, 1), model)


def _train_states(args: argparse.Namespace, model, tokenizer, text, bar
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The MoE's states and routes on the training data: Wikipedia text, the MoE's own answers
    to instructions from Wikipedia's train split, and (--corpus-answers) the dense model's
    answers from the distillation corpus's train split, read by the MoE.
    """
    def read() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        answers = own_answers(model, tokenizer, distill.wiki_articles("train"), args.answers,
                              args.answer_tokens, args.seed,
                              lambda d, t: bar("own answers", d, t))
        sequences = itertools.chain(text("train", args.tokens), (a.ids for a in answers),
                                    _corpus_answers(args.corpus_answers, args.seed))
        big = args.corpus_answers or args.tokens > 50_000
        return moe_states(model, sequences, torch.bfloat16 if big else torch.float32)

    return _cached(args, model, "train", read)


def _held_states(args: argparse.Namespace, model, tokenizer, text) -> dict:
    """Held-out states: Wikipedia's held-out text and the MoE's own answers to instructions
    from held-out articles (the tuning split of every choice here).
    """
    def read() -> dict:
        held = {"text": moe_states(model, text("heldout", args.tokens // 4))}
        if args.answers:
            answers = own_answers(model, tokenizer, distill.wiki_articles("heldout"),
                                  max(8, args.answers // 4), args.answer_tokens, args.seed + 1)
            held["answers"] = moe_states(model, (a.ids for a in answers))
        return held

    return _cached(args, model, "held", read)


def _cached(args: argparse.Namespace, model, part: str, read):
    """`read()`, or what it returned before with the same MoE files and data settings when
    --states-cache is on (kept in the model cache, written atomically): reading 100k tokens
    costs minutes, and a refit with other training settings needs the same states.
    """
    from m2r2core.runtime.model import fingerprint
    from m2r2core.train.common import work_dir

    if not getattr(args, "states_cache", False):
        return read()
    # the model's fingerprint is the base model's (architecture and head): every MoE cut from
    # it shares it, so the MoE's own files (MoEfication and distillation) are in the key too
    key = {"part": part, "moe": fingerprint(model), "moe_files": files_digest(Path(args.trained)),
           "tokens": args.tokens, "answers": args.answers, "answer_tokens": args.answer_tokens,
           "corpus_answers": args.corpus_answers if part == "train" else 0, "seed": args.seed,
           "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = work_dir(DEFAULT_MODEL) / f"accel-states-{part}-{digest}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == key:
                print(f"{part} states from {path}")
                return saved["value"]
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            print(f"{path} is unreadable ({err}); reading the states again")
    value = read()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "value": value}, tmp)
    tmp.replace(path)
    return value


def _corpus_answers(count: int, seed: int) -> Iterator[list[int]]:
    """Up to `count` chat answers (prompt and the dense model's answer, at most 384 tokens) of
    the distillation corpus's train split as first built (growth rounds left out, so a fit's
    sample does not change as the corpus grows); none when the corpus is not built (it says
    so).
    """
    from m2r2core.train import corpus
    from m2r2core.train.common import train_split, work_dir

    if not count:
        return
    folder = work_dir(DEFAULT_MODEL) / "corpus"
    chat = train_split(corpus.finished(folder, "train", growth=False)) \
        if (folder / "plan.jsonl").is_file() else []  # the first build's: a stable sample
    if not chat:
        print(f"no corpus answers in {folder}: build it with `python -m m2r2core.train corpus`")
        return
    for sample in random.Random(seed).sample(chat, min(count, len(chat))):
        yield sample.ids[:384]


def _report(args: argparse.Namespace, moe, held: dict, accel, tokens: int, fit_seconds,
            model) -> None:
    """Held-out recall of pre-gating and m2r2 by distance; write the accelerator and card."""
    from m2r2core.moe import prefetch
    from m2r2core.runtime.model import fingerprint

    metrics = {"fit_seconds": fit_seconds,
               "accelerator": "per-distance" if accel.distances else "shared",
               "maps_kept": int((accel.b.flatten(0, -3).abs().sum((-1, -2)) > 0).sum()),
               "maps": int(accel.b.flatten(0, -3).shape[0]),
               "answers": args.answers, "answer_tokens": args.answer_tokens,
               "corpus_answers": getattr(args, "corpus_answers", 0),
               "loss": getattr(args, "loss", "set"), "lr": getattr(args, "lr", 2e-3),
               "batch_tokens": getattr(args, "batch_tokens", 0)}
    for kind, (held_states, held_used) in held.items():
        metrics[f"heldout_{kind}_tokens"] = int(held_states[0].shape[0])
        suffix = "" if kind == "text" else f"_{kind}"
        for margin in sorted({0, args.margin}):  # margin 0: the benchmark's and page's default
            gaps = [None, *getattr(args, "margin_gap", [])] if margin else [None]
            for name, fast in (("pregate", None), ("m2r2", accel)):
                for d, gap in itertools.product(range(1, args.lookahead + 1), gaps):
                    recall, extra = _state_recall(moe, held_states, held_used, fast, d,
                                                  moe.top_k + margin, gap)
                    key = f"{name}_d{d}_margin{margin}" + ("" if gap is None else f"_gap{gap:g}")
                    metrics[f"recall_{key}{suffix}"] = round(recall, 4)
                    if gap is not None:  # the price: experts named beyond the top-k
                        metrics[f"extra_{key}{suffix}"] = round(extra, 4)
    card = prefetch.AccelCard(model_fingerprint=fingerprint(model), rank=accel.a.shape[-2],
                              lookahead=args.lookahead, tokens=tokens,
                              steps=args.steps, metrics=metrics,
                              moe_files=files_digest(Path(args.trained)))
    prefetch.save_route_accelerator(accel, card, Path(args.trained))
    print(json.dumps(metrics, indent=2))
