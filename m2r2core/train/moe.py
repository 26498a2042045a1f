"""Fitting the MoEfication and the MoE's route accelerator, and measuring their cost.

    python -m m2r2core.train.moe fit         # cluster neurons, fit routers; card with the cost
    python -m m2r2core.train.moe fit-accel   # the route accelerator m2r2 prefetching uses
    python -m m2r2core.train.moe build       # write the MoE folder (moe/moefy.py does the work)
    python -m m2r2core.train.moe distill     # distil the MoE against the dense model
    python -m m2r2core.train.moe quality     # perplexity, answers, routers: each MoE vs dense

The files they write are the committed artifacts under `artifacts/smollm2-135m-moe/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from m2r2core.config import EngineConfig
from m2r2core.errors import ConfigError, M2R2Error
from m2r2core.moe.moefy import (
    CARD,
    TRAINED_DIR,
    WEIGHTS,
    MoeCard,
    _activations,
    _mlp_inputs,
    build,
    load_trained,
    moe_model,
    moe_state,
    refit_all,
)
from m2r2core.moe.prefetch import ACCEL_LOSSES
from m2r2core.runtime.model import DEFAULT_MODEL, load
from m2r2core.train import distill, moe_distill, moe_quality
from m2r2core.train.common import labelled_bars
from m2r2core.train.moe_accel import cmd_fit_accel

log = logging.getLogger(__name__)


def cluster_neurons(importance: torch.Tensor, n_experts: int, seed: int, iters: int = 15
                    ) -> torch.Tensor:
    """Balanced co-activation clustering of neurons.

    Args:
        importance: (T, I) non-negative per-token contribution of each neuron.

    Returns:
        (E, I/E) neuron indices per expert; every neuron in exactly one expert.
    """
    n_neurons = importance.shape[1]
    if n_neurons % n_experts:
        raise ConfigError(f"{n_neurons} neurons do not split into {n_experts} equal experts; "
                          f"choose an expert count that divides {n_neurons}.")
    size = n_neurons // n_experts
    features = F.normalize(importance.T, dim=1)  # (I, T): a neuron's co-activation profile
    gen = torch.Generator().manual_seed(seed)
    centres = features[torch.randperm(n_neurons, generator=gen)[:n_experts]].clone()
    assignment = torch.zeros(n_neurons, dtype=torch.long)
    for _ in range(iters):
        similarity = features @ centres.T  # (I, E)
        assignment = _balanced_assign(similarity, size)
        for e in range(n_experts):
            centres[e] = F.normalize(features[assignment == e].mean(0), dim=0)
    return torch.stack([torch.nonzero(assignment == e)[:, 0] for e in range(n_experts)])


def _balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy balanced assignment: best (neuron, expert) pairs first, each expert takes `size`."""
    n_neurons, n_experts = similarity.shape
    order = torch.argsort(similarity.flatten(), descending=True)
    assignment = torch.full((n_neurons,), -1, dtype=torch.long)
    room = [size] * n_experts
    left = n_neurons
    for flat in order.tolist():
        neuron, expert = divmod(flat, n_experts)
        if assignment[neuron] < 0 and room[expert]:
            assignment[neuron] = expert
            room[expert] -= 1
            left -= 1
            if not left:
                break
    return assignment


def expert_scores(mlp, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(T, E) norm of each expert's output: the oracle a router learns to rank."""
    act = _activations(mlp, x)
    down = mlp.down_proj.weight.float()
    return torch.stack([F.linear(act[:, idx], down[:, idx]).norm(dim=-1) for idx in experts], 1)


def fit_router(x: torch.Tensor, scores: torch.Tensor, top_k: int, steps: int, seed: int
               ) -> torch.Tensor:
    """A linear router (E, H) whose top-k matches the oracle's top-k experts (listwise loss)."""
    torch.manual_seed(seed)
    n_experts = scores.shape[1]
    target = F.softmax(torch.log(scores + 1e-6) * 4.0, dim=-1)  # sharpened oracle ranking
    weight = torch.zeros(n_experts, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight], lr=3e-3)
    for _ in range(steps):
        logits = x @ weight.T
        loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach()


def topk_recall(logits: torch.Tensor, scores: torch.Tensor, top_k: int) -> float:
    """Share of the oracle's top-k experts that the router's top-k also picks."""
    picked = logits.topk(top_k, -1).indices
    oracle = scores.topk(top_k, -1).indices
    hits = (picked[:, :, None] == oracle[:, None, :]).any(-1).float()
    return float(hits.mean())


def fit(model, tokenizer, n_experts: int, top_k: int, shared_size: int,
        dense_layers: list[int], n_tokens: int, router_steps: int, seed: int, progress=None
        ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split every MoE layer's neurons (shared + clustered experts) and fit its router on
    train-split Wikipedia text.
    """
    articles = distill.wiki_articles("train")
    inputs = _mlp_inputs(model, tokenizer, articles, n_tokens, 256, seed,
                         progress and (lambda d, t: progress("reading text", d, t)))
    tensors, recalls = {}, {}
    layers = model.model.layers
    for index, (layer, x) in enumerate(zip(layers, inputs)):
        if index in dense_layers:
            continue
        mlp = layer.mlp
        with torch.no_grad():
            act = _activations(mlp, x)
            importance = act.abs() * mlp.down_proj.weight.float().norm(dim=0)
            order = importance.mean(0).argsort(descending=True)
            shared, rest = order[:shared_size], order[shared_size:]
            experts = rest[cluster_neurons(importance[:, rest], n_experts, seed + index)]
            scores = expert_scores(mlp, x, experts)
        split = int(len(x) * 0.9)
        router = fit_router(x[:split], scores[:split], top_k, router_steps, seed + index)
        router = router / (x @ router.T).abs().max()  # logits within ±1 on the fitting text
        recalls[index] = topk_recall(x[split:] @ router.T, scores[split:], top_k)
        tensors[f"layers.{index}.shared"] = shared.sort().values.to(torch.int32).contiguous()
        tensors[f"layers.{index}.experts"] = experts.sort(1).values.to(torch.int32).contiguous()
        tensors[f"layers.{index}.router"] = router.contiguous()
        if progress:
            progress("clustering and routers", index + 1, len(layers))
    return tensors, {"router_recall_heldout_tokens": round(sum(recalls.values()) / len(recalls),
                                                           4),
                     "router_recall_by_layer": {str(k): round(v, 4) for k, v in recalls.items()},
                     "tokens": int(len(inputs[0]))}


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 256) -> float:
    """Token perplexity of a causal LM on texts (each cut to seq_len tokens)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :seq_len]
            if ids.shape[1] < 2:
                continue
            logits = model(ids).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(total / count)


def heldout_texts(count: int, seed: int = 0) -> list[str]:
    """Held-out Wikipedia lead sections (never used to fit): the perplexity set."""
    articles = distill.wiki_articles("heldout")
    random.Random(seed).shuffle(articles)
    return [a["extract"] for a in articles[:count]]


def _card(args: argparse.Namespace, metrics: dict) -> MoeCard:
    return MoeCard(base_model=DEFAULT_MODEL, n_experts=args.experts, top_k=args.top_k,
                   shared_size=args.shared, dense_layers=sorted(args.dense_layers),
                   refit_tokens=args.refit_tokens, router_scale=args.router_scale,
                   seed=args.seed, tokens=args.tokens, router_steps=args.router_steps,
                   metrics=metrics)


def chat_quality(dense, moe, tokenizer, n_prompts: int, max_new_tokens: int) -> dict:
    """Greedy MT-Bench answers of the MoE against the dense model's: ROUGE-L and the share of
    answers whose first 8 tokens agree.
    """
    from analysis.exits import rouge_l
    from analysis.prompts import load_prompts
    from m2r2core.runtime import prompt as prompt_mod

    scores, starts, samples = [], [], []
    for item in load_prompts("mt-bench")[:n_prompts]:
        ids = torch.tensor([prompt_mod.encode(tokenizer, item.text, True, None)])
        outs = []
        for model in (dense, moe):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens)
            outs.append(out[0, ids.shape[1]:].tolist())
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        scores.append(rouge_l(texts[1], texts[0]))
        starts.append(outs[0][:8] == outs[1][:8])
        if len(samples) < 3:
            samples.append({"prompt": item.text[:200], "dense": texts[0], "moe": texts[1]})
    return {"rouge_l_vs_dense": round(sum(scores) / len(scores), 4),
            "first_8_tokens_agree": round(sum(starts) / len(starts), 4),
            "chat_prompts": len(scores), "chat_max_new_tokens": max_new_tokens,
            "samples": samples}


def cmd_fit(args: argparse.Namespace) -> None:
    """Cluster, fit routers, measure perplexity and chat quality, write the trained files."""
    torch.set_num_threads(args.threads)
    loaded = load(EngineConfig(model=DEFAULT_MODEL, dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    out = Path(args.out)
    if args.reuse:
        card, tensors = load_trained(out)
        metrics = {k: v for k, v in card.metrics.items()
                   if k in ("router_recall_heldout_tokens", "router_recall_by_layer", "tokens",
                            "fit_seconds")}
    else:
        start = time.perf_counter()
        tensors, metrics = fit(model, tokenizer, args.experts, args.top_k, args.shared,
                               args.dense_layers, args.tokens, args.router_steps, args.seed,
                               labelled_bars())
        metrics["fit_seconds"] = round(time.perf_counter() - start, 1)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS))
        (out / CARD).write_text(json.dumps(asdict(_card(args, metrics)), indent=2) + "\n")
    texts = heldout_texts(args.ppl_texts)
    metrics["ppl_dense"] = round(perplexity(model, tokenizer, texts), 3)
    metrics["ppl_texts"] = len(texts)
    for k in sorted({args.top_k, *args.also_k}):
        card = dataclasses.replace(_card(args, metrics), top_k=k)
        downs = refit_all(model, tokenizer, tensors, card, labelled_bars())
        moe = moe_model(*moe_state(model, tensors, card, downs))
        metrics[f"ppl_top{k}"] = round(perplexity(moe, tokenizer, texts), 3)
        log.info("E=%d top-%d: perplexity %.2f (dense %.2f)", args.experts, k,
                 metrics[f"ppl_top{k}"], metrics["ppl_dense"])
        if k == args.top_k and args.chat_prompts:
            metrics["chat"] = chat_quality(model, moe, tokenizer, args.chat_prompts, 64)
    (out / CARD).write_text(json.dumps(asdict(_card(args, metrics)), indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


def cmd_build(args: argparse.Namespace) -> None:
    """Write the MoE folder into the model cache."""
    print(build(Path(args.trained), force=args.force, progress=labelled_bars()))


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m m2r2core.train.moe`."""
    p = argparse.ArgumentParser(prog="python -m m2r2core.train.moe",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="cluster neurons into experts and fit the routers")
    f.add_argument("--experts", type=int, default=8)
    f.add_argument("--top-k", type=int, default=2)
    f.add_argument("--shared", type=int, default=768,
                   help="neurons of the shared expert (768 since session 28; 384 before)")
    f.add_argument("--dense-layers", type=int, nargs="*", default=[0])
    f.add_argument("--refit-tokens", type=int, default=8192)
    f.add_argument("--chat-prompts", type=int, default=10, help="MT-Bench prompts for the "
                   "chat-quality comparison (0: skip)")
    f.add_argument("--also-k", type=int, nargs="*", default=[], help="also measure these k")
    f.add_argument("--tokens", type=int, default=8192)
    f.add_argument("--router-steps", type=int, default=300)
    f.add_argument("--ppl-texts", type=int, default=60)
    f.add_argument("--router-scale", type=float, default=0.02,
                   help="router logits are scaled to about ±this, so the k weights stay near 1/k")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--out", default=str(TRAINED_DIR))
    f.add_argument("--reuse", action="store_true",
                   help="keep the clustering and routers in --out; only re-measure")
    f.set_defaults(func=cmd_fit)
    b = sub.add_parser("build", help="write the MoE (Qwen2-MoE format) into the model cache")
    b.add_argument("--trained", default=str(TRAINED_DIR))
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_build)
    a = sub.add_parser("fit-accel", help="train the rate accelerator of the m2r2 predictor")
    a.add_argument("--trained", default=str(TRAINED_DIR))
    a.add_argument("--rank", type=int, default=32)
    a.add_argument("--lookahead", type=int, default=4)
    a.add_argument("--margin", type=int, default=1, help="margin of the reported recall")
    a.add_argument("--margin-gap", type=float, nargs="*", default=[],
                   help="also report held-out recall at --margin with its experts gated by "
                   "these gaps, and the experts each names beyond the top-k per layer")
    a.add_argument("--tokens", type=int, default=8192)
    a.add_argument("--steps", type=int, default=100)
    a.add_argument("--answers", type=int, default=64, help="instructions (from Wikipedia's "
                   "train split) whose MoE-generated answers join the training text (0: none)")
    a.add_argument("--answer-tokens", type=int, default=64)
    a.add_argument("--measure-only", action="store_true",
                   help="measure the committed accelerator's held-out recall again (no training)")
    a.add_argument("--shared", action="store_true", help="one accelerated state per layer for "
                   "every distance (default: one per distance d = 1 … lookahead)")
    a.add_argument("--corpus-answers", type=int, default=0, help="chat answers of the "
                   "distillation corpus's train split (the dense model's, read by the MoE) that "
                   "join the training text (0: none)")
    a.add_argument("--batch-tokens", type=int, default=0,
                   help="tokens per Adam step (0: every training token at once)")
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--loss", choices=ACCEL_LOSSES, default="set",
                   help="set: cross-entropy against the used experts as a set; rank: their "
                   "Plackett-Luce likelihood in the gate's order (top-k exact)")
    a.add_argument("--states-cache", action="store_true", help="keep the training states in "
                   "the model cache and reuse them for a refit with the same data settings")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=2)
    a.set_defaults(func=cmd_fit_accel)
    moe_distill.add_parser(sub)
    moe_quality.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry; a clear message, not a traceback, for the errors a person can fix."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except M2R2Error as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
