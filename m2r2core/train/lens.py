"""Training the tuned lens (m2r2core/stream/tuned_lens.py) on the distillation corpus.

    python -m m2r2core.train lens [--fit-samples N] [--steps N]

1. Ridge fit: for every layer l < N, the RMS-normalised final state regressed on the
   RMS-normalised state of layer l (sufficient statistics streamed over the train split, one
   slow pass without gradients); the linear part minus the identity is cut to --rank by SVD.
2. KL refinement: --steps Adam steps on KL(p_N || tuned p_l) at sampled answer positions.
3. Held-out: top-1 agreement with the full model on the test split's answers, per layer, for
   the logit lens and the tuned lens, written in the card.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from m2r2core.stream.tuned_lens import LensCard, TunedLens
from m2r2core.train.adapters import datasets, length_chunks, pad_rows, slow_states


def _normed(states: torch.Tensor) -> torch.Tensor:
    return states / states.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)


def _positions(parts, samples, seq_len: int, batch_tokens: int):
    """Per chunk of samples: the slow states at answer and text positions, (N+1, P, H)."""
    device = parts.lm_head.weight.device
    for chunk in length_chunks(samples, batch_tokens, seq_len):
        ids, lengths, starts = (t.to(device) for t in pad_rows(chunk, min(
            seq_len, max(len(s.ids) for s in chunk))))
        slow, _ = slow_states(parts, ids)
        steps = torch.arange(ids.shape[1], device=device)[None]
        keep = (steps < lengths[:, None]) & (steps >= starts[:, None])
        yield torch.stack([s[keep] for s in slow]).float()


@torch.no_grad()
def ridge_fit(parts, samples, seq_len: int, rank: int, ridge: float,
              batch_tokens: int = 4096) -> TunedLens:
    """The ridge-regression translators, their deltas cut to `rank`."""
    n, hidden = parts.n_layers, parts.config.hidden_size
    gram = torch.zeros(n - 1, hidden + 1, hidden + 1, dtype=torch.float64)
    cross = torch.zeros(n - 1, hidden + 1, hidden, dtype=torch.float64)
    scale = torch.zeros(n - 1, dtype=torch.float64)
    count = 0
    for states in _positions(parts, samples, seq_len, batch_tokens):
        target = _normed(states[n]).double()
        for layer in range(1, n):
            x = _normed(states[layer]).double()
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            gram[layer - 1] += x1.T @ x1
            cross[layer - 1] += x1.T @ target
            scale[layer - 1] += states[layer].double().pow(2).mean(-1).sqrt().sum()
        count += states.shape[1]
    lens = TunedLens(n, hidden, rank)
    eye = torch.eye(hidden + 1, dtype=torch.float64) * ridge * count
    for index in range(n - 1):
        solution = torch.linalg.solve(gram[index] + eye, cross[index])  # (H+1, H)
        delta = solution[:hidden] - torch.eye(hidden, dtype=torch.float64)
        left, singular, right = torch.linalg.svd(delta)
        # h @ delta ~ ((h @ left_r) * s_r) @ right_r: V = (left_r * s_r)^T, U = right_r^T.
        lens.V.data[index] = (left[:, :rank] * singular[:rank]).T.float()
        lens.U.data[index] = right[:rank].T.float()
        # The bias was fitted in normalised units: scale it by the layer's mean RMS.
        lens.bias.data[index] = (solution[hidden] * scale[index] / count).float()
    return lens


def refine(parts, lens: TunedLens, samples, seq_len: int, steps: int, positions: int,
           lr: float, seed: int, progress=None, batch_tokens: int = 2048) -> list[float]:
    """KL(p_N || tuned p_l) over every layer at `positions` sampled answer positions a step."""
    n = parts.n_layers
    optim = torch.optim.Adam(lens.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        order = torch.randperm(len(samples), generator=gen).tolist()
        for states in _positions(parts, [samples[i] for i in order], seq_len, batch_tokens):
            pick = torch.randperm(states.shape[1], generator=gen)[:positions]
            chosen = states[1:, pick].to(parts.lm_head.weight.dtype)  # (N, P, H)
            with torch.no_grad():
                teacher = F.log_softmax(parts.lm_head(parts.norm(chosen[-1])).float(), -1)
            moved = lens.translate_stack(chosen)[:-1]  # (N-1, P, H)
            student = F.log_softmax(parts.lm_head(parts.norm(moved)).float(), -1)
            loss = F.kl_div(student, teacher.expand_as(student), log_target=True,
                            reduction="sum") / (positions * (n - 1))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(len(losses), steps)
            if len(losses) >= steps:
                break
    return losses


@torch.no_grad()
def agreement(parts, lens: TunedLens, samples, seq_len: int) -> dict[str, list[float]]:
    """Top-1 agreement with the final token at layers 1..N: logit lens and tuned lens."""
    n = parts.n_layers
    hits = {"logit": torch.zeros(n), "tuned": torch.zeros(n)}
    count = 0
    for states in _positions(parts, samples, seq_len, 4096):
        states = states[1:].to(parts.lm_head.weight.dtype)
        final = parts.lm_head(parts.norm(states[-1])).argmax(-1)
        moved = lens.translate_stack(states)
        for layer in range(n):
            hits["logit"][layer] += float(
                (parts.lm_head(parts.norm(states[layer])).argmax(-1) == final).sum())
            hits["tuned"][layer] += float(
                (parts.lm_head(parts.norm(moved[layer])).argmax(-1) == final).sum())
        count += len(final)
    return {k: [round(float(v) / max(count, 1), 4) for v in h] for k, h in hits.items()}


def cmd_lens(args: argparse.Namespace) -> None:
    """Fit, refine, measure and save the tuned lens."""
    from m2r2core.runtime.model import fingerprint
    from m2r2core.train.common import default_out, frozen_model, progress_bar

    loaded, parts, _ = frozen_model(args)
    model_fp = fingerprint(loaded.model)
    data, source = datasets(args, model_fp)
    started = time.time()
    fit = data["train"][:args.fit_samples]
    lens = ridge_fit(parts, fit, args.seq_len, args.rank, args.ridge)
    fit_s = time.time() - started
    before = agreement(parts, lens, data["dev"], args.seq_len)
    losses = refine(parts, lens, data["train"], args.seq_len, args.steps, args.positions,
                    args.lr, args.seed, progress_bar("refining the tuned lens"))
    dev = agreement(parts, lens, data["dev"], args.seq_len)
    test = agreement(parts, lens, data["test"], args.seq_len)
    card = LensCard(
        model_name=args.model, model_fingerprint=model_fp, n_layers=parts.n_layers,
        hidden_size=parts.config.hidden_size, rank=args.rank,
        training={"data": source, "fit_samples": len(fit), "ridge": args.ridge,
                  "steps": args.steps, "positions": args.positions, "lr": args.lr,
                  "seq_len": args.seq_len, "seed": args.seed, "dtype": args.dtype,
                  "threads": torch.get_num_threads(), "fit_s": round(fit_s, 1),
                  "wall_s": round(time.time() - started, 1)},
        metrics={"kl_first": round(losses[0], 4) if losses else None,
                 "kl_last": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)
                 if losses else None,
                 "dev_after_fit": before["tuned"], "dev": dev,
                 "held_out": test, "held_out_split": "test"},
    )
    lens.save(args.out or default_out(args.model), card)
    print({"test_logit_lens": test["logit"], "test_tuned_lens": test["tuned"]})
