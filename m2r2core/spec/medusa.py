"""Medusa-style draft heads: a peer of M2R2 drafting that needs no second stream.

Head k (k = 1..K) reads the model's final normalised state at the position that produced the
next token x_{t+1} and guesses x_{t+1+k}: a residual block h + SiLU(W_k h + b_k) followed by the
model's own (frozen, shared) LM head. As in Medusa-1 the base model is untouched; unlike Medusa-1
the heads share the LM head instead of each training a copy of it (49,152 x 576 here), so all K
heads together are K * (H*H + H) parameters. The speculative decoder (`stream="medusa"` in
m2r2core/spec/speculative.py) verifies their chain with the unmodified model, so output stays the
model's own.

Training (`python -m m2r2core.train medusa`) uses the same self-distillation corpus as the
accelerator adapters: head k at position t learns the model's own greedy token at t + k (which,
on the distilled answers, is the text itself). Like Medusa, which trains on assistant tokens
only, positions come from the answers and the plain text, never from the instruction template.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.runtime.hf_compat import DecoderParts

HEADS_FILE = "medusa.safetensors"
HEADS_CARD = "medusa.json"
TRAIN_HEADS = "python -m m2r2core.train medusa"


class MedusaHeads(nn.Module):
    """K residual blocks on the final normalised state; the LM head is the model's own."""

    def __init__(self, hidden_size: int, n_heads: int) -> None:
        """Fresh heads whose blocks start as the identity (zero weights, as in Medusa)."""
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(n_heads))
        for linear in self.proj:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def n_heads(self) -> int:
        """K, the longest chain the heads can draft."""
        return len(self.proj)

    def head(self, k: int, normed: torch.Tensor) -> torch.Tensor:
        """Head k's (0-based) LM-head input for (..., H) final normalised states."""
        return normed + F.silu(self.proj[k](normed))

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """(..., H) final normalised states -> (..., K, H) inputs of the LM head."""
        return torch.stack([self.head(k, normed) for k in range(self.n_heads)], dim=-2)


@dataclass
class HeadsCard:
    """What the JSON card beside the heads says."""

    model_name: str
    model_fingerprint: str
    hidden_size: int
    n_heads: int
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def save_heads(heads: MedusaHeads, folder: Path, card: HeadsCard) -> None:
    """Write medusa.safetensors and medusa.json atomically (temp files, then rename)."""
    artifacts.save(folder, HEADS_FILE, {k: v.to(torch.bfloat16) for k, v in
                                        heads.state_dict().items()}, HEADS_CARD, asdict(card))


def load_heads(folder: Path, hidden_size: int, model_name: str, model_fingerprint: str
               ) -> tuple[MedusaHeads, HeadsCard] | None:
    """The heads trained for this model in `folder`; None where the folder has none.

    Raises:
        AdapterError: heads of another model, or a corrupt card or weights file.
    """
    folder = Path(folder)
    if not (folder / HEADS_CARD).is_file():
        return None
    card, raw = artifacts.read_record(folder, HEADS_CARD, HeadsCard, "Medusa head", TRAIN_HEADS)
    artifacts.check_model(raw, folder, "Medusa heads", model_name, model_fingerprint,
                          hidden_size=(card.hidden_size, hidden_size))
    tensors = artifacts.load_tensors(folder, HEADS_FILE, "Medusa head", TRAIN_HEADS)
    return artifacts.fill(MedusaHeads(hidden_size, card.n_heads), tensors, folder,
                          "Medusa head", TRAIN_HEADS), card


def head_pairs(greedy: torch.Tensor, index: torch.Tensor, answer: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions t, labels) for head k: answer positions t, labelled with the model's greedy
    token at t + k of the same row.
    """
    total = len(greedy)
    t = torch.arange(total - k)
    t = t[(index[t + k] == index[t] + k) & answer[t]]
    return t, greedy[t + k]


def train_heads(parts: DecoderParts, data: tuple, n_heads: int, epochs: int, batch: int,
                lr: float, seed: int, progress: Callable[[int, int], None] | None = None,
                log: Callable[[dict], None] | None = None) -> MedusaHeads:
    """Fit K heads by cross-entropy through the frozen LM head (the model's dtype), AdamW."""
    states, greedy, index, answer = data
    torch.manual_seed(seed)
    heads = MedusaHeads(states.shape[1], n_heads)
    optim = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    weight = parts.lm_head.weight.detach()
    pairs = [head_pairs(greedy, index, answer, k) for k in range(1, n_heads + 1)]
    steps_per_epoch = max(1, min(len(t) for t, _ in pairs) // batch)
    total, step, gen = epochs * steps_per_epoch, 0, torch.Generator().manual_seed(seed)
    started = time.time()
    for _ in range(epochs):
        orders = [torch.randperm(len(t), generator=gen) for t, _ in pairs]
        for s in range(steps_per_epoch):
            lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optim.param_groups:
                group["lr"] = lr_now
            losses, metrics = [], {}
            for k, ((t, labels), order) in enumerate(zip(pairs, orders, strict=True)):
                pick = order[s * batch:(s + 1) * batch]
                x = states[t[pick]].float()
                out = heads.head(k, x)
                logits = F.linear(out.to(weight.dtype), weight).float()
                loss = F.cross_entropy(logits, labels[pick])
                losses.append(loss)
                metrics[f"loss@{k + 1}"] = float(loss.detach())
                metrics[f"top1@{k + 1}"] = float((logits.argmax(-1) == labels[pick]).float()
                                                 .mean())
            optim.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            optim.step()
            step += 1
            if log:
                log(metrics | {"step": step, "lr": lr_now, "elapsed_s": time.time() - started})
            if progress:
                progress(step, total)
    return heads.requires_grad_(False).eval()


@torch.no_grad()
def head_accuracy(parts: DecoderParts, heads: MedusaHeads, data: tuple, chunk: int = 1024
                  ) -> list[float]:
    """Top-1 agreement of each head with the model's own greedy token k ahead (held-out data).

    Head 1's figure is the first draft's acceptance rate under greedy verification when the
    context is the model's own text; head k's is the k-th draft's, ignoring that it is only
    reached when the drafts before it were accepted.
    """
    states, greedy, index, answer = data
    weight = parts.lm_head.weight
    out = []
    for k in range(1, heads.n_heads + 1):
        t, labels = head_pairs(greedy, index, answer, k)
        hits = 0
        for start in range(0, len(t), chunk):
            x = states[t[start:start + chunk]].float()
            y = heads.head(k - 1, x)
            hits += int((F.linear(y.to(weight.dtype), weight).argmax(-1)
                         == labels[start:start + chunk]).sum())
        out.append(hits / max(1, len(t)))
    return out
