"""A greedy soup of adapters: the average of several trained states, chosen on the dev split.

    python -m m2r2core.train soup --ingredients DIR [DIR ...] --out DIR [--report FILE]

Continuations from one committed state, trained on different data or with different settings,
sit close together in weight space; their average often generalises better than any of them
(the "model soups" of Wortsman et al., 2022). The greedy recipe: measure every ingredient on the
dev split, start from the best, and add each next-best one to the average only if the average's
dev agreement at depth N/r does not fall. LoRA factors are averaged one by one (A with A, B with
B), which matches averaging their products while the ingredients stay close to their common
start. The chosen soup is measured once on the test split and written with a card naming its
ingredients; nothing is written when no ingredient loads.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch

from m2r2core.artifacts import portable
from m2r2core.errors import M2R2Error
from m2r2core.stream.accel import Accelerator, load_accelerator
from m2r2core.train.adapters import held_out_agreement
from m2r2core.train.common import command_line, emit_report, frozen_model
from m2r2core.train.data import datasets

log = logging.getLogger("m2r2core.train")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes (float32)."""
    keys = set(states[0])
    for state in states[1:]:
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise M2R2Error("Soup ingredients must have the same adapter shape.")
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}


def greedy_soup(scores: dict[str, float], score_of) -> tuple[list[str], float, list[dict]]:
    """Greedy soup over named ingredients: start from the best-scoring one, add each next one
    (in falling score order) when `score_of(names)` of the average with it is at least the
    current score. Returns the names kept, their score and every trial in order.
    """
    order = sorted(scores, key=lambda name: -scores[name])
    kept, best = [order[0]], scores[order[0]]
    trials = [{"soup": list(kept), "dev_score": best, "kept": True}]
    for name in order[1:]:
        score = score_of(kept + [name])
        trials.append({"soup": kept + [name], "dev_score": score, "kept": score >= best})
        if score >= best:
            kept, best = kept + [name], score
    return kept, best, trials


def soup_training(trainings: list[dict], kept: list[str], scores: dict[str, float],
                  data: str) -> dict:
    """The soup card's training record: the settings every kept ingredient shares, what each
    ingredient was (run, step, tokens), and the tokens they trained on together.
    """
    shared = {k: v for k, v in trainings[0].items()
              if all(t.get(k) == v for t in trainings[1:])
              and k not in ("run", "step", "tokens_this_run", "wall_s_this_run")}
    return shared | {
        "run": "soup", "soup": kept, "ingredients": scores, "data": data,
        "ingredient_runs": {n: {k: t.get(k) for k in ("run", "step", "tokens_this_run", "init")}
                            for n, t in zip(kept, trainings, strict=True)},
        "tokens_this_run": sum(int(t.get("tokens_this_run") or 0) for t in trainings)}


def cmd_soup(args: argparse.Namespace) -> None:
    """Measure the ingredients on dev, build the greedy soup, test it, write it and a report."""
    from m2r2core.runtime.model import fingerprint

    if len(args.ingredients) < 2:
        raise M2R2Error("A soup needs at least two ingredients (--ingredients DIR DIR ...).")
    if args.out is None:
        raise M2R2Error("Say where the soup goes (--out DIR); the committed adapters are "
                        "replaced only by copying a soup that beats them on test.")
    loaded, parts, _ = frozen_model(args)
    model_print = fingerprint(loaded.model)
    device = parts.lm_head.weight.device
    accels, cards = {}, {}
    for folder in args.ingredients:
        name = folder.name
        if name in accels:
            raise M2R2Error(f"Two ingredients are named {name}; give distinct folders.")
        accel, card = load_accelerator(folder, parts, args.model, model_print)
        if cards and card.config != next(iter(cards.values())).config:
            raise M2R2Error(f"{folder} has another adapter shape than {args.ingredients[0]}.")
        accels[name], cards[name] = accel.to(device), card
    splits, source = datasets(args, model_print)
    dev = splits["dev"][:args.eval_samples]
    first = next(iter(accels.values()))
    depth = min(first.max_depth, math.ceil(parts.n_layers / first.config.rate))
    index = depth - first.depths.start
    started = time.time()

    def score(accel: Accelerator) -> float:
        return held_out_agreement(parts, accel, dev, args.seq_len)["fast"][index]

    scores = {}
    for name, accel in accels.items():
        scores[name] = score(accel)
        log.info("ingredient %s: dev agreement at depth %d = %.4f", name, depth, scores[name])
    states = {name: accel.state_dict() for name, accel in accels.items()}
    soup = Accelerator(parts, first.config).to(device)

    def soup_score(names: list[str]) -> float:
        soup.load_state_dict(average([states[n] for n in names]))
        found = score(soup)
        log.info("soup of %s: dev agreement at depth %d = %.4f", names, depth, found)
        return found

    kept, best, trials = greedy_soup(scores, soup_score)
    soup.load_state_dict(average([states[n] for n in kept]))
    card = cards[kept[0]]
    card.training = soup_training([cards[n].training for n in kept], kept, scores, source)
    card.metrics = {"report_depth": depth}
    soup.save(args.out, card)
    # measured as saved (bfloat16 weights), the way every reader will load it
    saved, card = load_accelerator(args.out, parts, args.model, model_print)
    saved.to(device)
    test = held_out_agreement(parts, saved, splits["test"], args.seq_len)
    card.metrics |= {"dev_lens_agreement": held_out_agreement(parts, saved, dev, args.seq_len),
                     "held_out_lens_agreement": test}
    saved.save(args.out, card)
    report = {"command": command_line(args),
              "depth": depth, "dev_samples": len(dev), "test_samples": len(splits["test"]),
              "dtype": args.dtype, "ingredients": scores, "trials": trials, "soup": kept,
              "dev_score": best, "test_agreement": test["fast"],
              "wall_s": round(time.time() - started, 1), "out": portable(str(args.out))}
    log.info("soup %s: dev %.4f, test at depth %d %.4f (written to %s)", kept, best, depth,
             test["fast"][index], args.out)
    emit_report(report, args.report)
