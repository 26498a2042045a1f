"""A greedy soup of adapters: the average of several trained states, chosen on the dev split.

    python -m m2r2core.train soup --ingredients DIR [DIR ...] --out DIR [--report FILE]

An ingredient is a saved adapter folder (a run's `-best` folder, the committed adapters) or a
training run's checkpoint (the run folder or its `checkpoint.pt`: the state where the run
stopped, which a run saves nowhere else when it never beat its start on dev). At least one must
be a saved folder: it gives the soup its shape and card.

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
import pickle
import time
from pathlib import Path

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
    settled = [t for t in trainings if not t.get("checkpoint")] or [{}]
    shared = {k: v for k, v in settled[0].items()
              if all(t.get(k) == v for t in settled[1:])
              and k not in ("run", "step", "tokens_this_run", "wall_s_this_run")}
    return shared | {
        "run": "soup", "soup": kept, "ingredients": scores, "data": data,
        "ingredient_runs": {n: {k: t.get(k) for k in ("run", "step", "tokens_this_run", "init")}
                            for n, t in zip(kept, trainings, strict=True)},
        "tokens_this_run": sum(int(t.get("tokens_this_run") or 0) for t in trainings)}


def checkpoint_path(path: Path) -> Path | None:
    """The training checkpoint an ingredient names (a .pt file, or a run folder holding
    checkpoint.pt and no saved adapters), or None for a saved adapter folder.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return path
    if (path / "checkpoint.pt").is_file() and not (path / "card.json").is_file():
        return path / "checkpoint.pt"
    return None


def load_checkpoint(path: Path, parts, config) -> tuple[str, Accelerator, dict]:
    """A run's checkpoint as an ingredient: its name (`<run>@<step>`), the adapters in an
    Accelerator of `config` on `parts`, and a training record (run, step, tokens).
    """
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        accel = Accelerator(parts, config)
        accel.load_state_dict({k: v.float() for k, v in state["adapters"].items()})
    except (OSError, EOFError, KeyError, RuntimeError, TypeError, ValueError,
            pickle.UnpicklingError) as err:
        raise M2R2Error(f"Cannot use {path} as a soup ingredient: not a training checkpoint of "
                        f"this adapter shape ({str(err).splitlines()[0]}).") from err
    run, step = path.parent.name, int(state.get("step", 0))
    return f"{run}@{step}", accel, {"run": run, "step": step, "checkpoint": True,
                                    "tokens_this_run": int(state.get("tokens", 0)),
                                    "init": None}


def _ingredients(paths: list[Path], parts, model_name: str, model_print: str, device
                 ) -> tuple[dict[str, Accelerator], dict, dict[str, dict], str]:
    """Load every ingredient: ({name: adapters}, {name: card} of the saved folders,
    {name: training record}, the name of the first saved folder, whose shape all must share).
    """
    accels, cards, trainings = {}, {}, {}
    checkpoints = [p for p in paths if checkpoint_path(p) is not None]
    folders = [p for p in paths if checkpoint_path(p) is None]
    if not folders:
        raise M2R2Error("A soup needs at least one saved adapter folder among its ingredients "
                        "(it gives the soup its shape and card); checkpoints alone do not.")
    for folder in folders:
        name = folder.name
        if name in accels:
            raise M2R2Error(f"Two ingredients are named {name}; give distinct folders.")
        accel, card = load_accelerator(folder, parts, model_name, model_print)
        if cards and card.config != next(iter(cards.values())).config:
            raise M2R2Error(f"{folder} has another adapter shape than {folders[0]}.")
        accels[name], cards[name], trainings[name] = accel.to(device), card, card.training
    for path in checkpoints:
        name, accel, training = load_checkpoint(checkpoint_path(path), parts,
                                                 accels[folders[0].name].config)
        if name in accels:
            raise M2R2Error(f"Two ingredients are named {name}; give distinct checkpoints.")
        accels[name], trainings[name] = accel.to(device), training
    return accels, cards, trainings, folders[0].name


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
    accels, cards, trainings, shape = _ingredients(args.ingredients, parts, args.model,
                                                   model_print, device)
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
    card = cards[next((n for n in kept if n in cards), shape)]
    card.training = soup_training([trainings[n] for n in kept], kept, scores, source)
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
