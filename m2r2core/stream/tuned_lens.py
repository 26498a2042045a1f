"""The tuned lens (Belrose et al. 2023): an affine translator per slow layer, trained so that
W_U LN_f(T_l(h_l)) matches the model's final distribution. The standard tool for reading
intermediate layers, and the strongest distance-based baseline M2R2 claims to beat.

T_l(h) = h + U_l V_l h + c_l: the identity plus a low-rank delta and a bias (rank is a choice:
the full affine translator of the paper is rank H; a low rank keeps the committed file small).
Layers 1..N-1 have translators; layer N is the model's own head. Fitted by ridge regression of
the (RMS-normalised) final state on each layer's state, then refined with KL to the final
distribution (`python -m m2r2core.train lens`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from m2r2core import artifacts
from m2r2core.runtime.hf_compat import DecoderParts

LENS_FILE = "tuned_lens.safetensors"
LENS_CARD = "tuned_lens.json"
TRAIN_LENS = "python -m m2r2core.train lens"


@dataclass
class LensCard:
    """What the JSON card beside the translators says."""

    model_name: str
    model_fingerprint: str
    n_layers: int
    hidden_size: int
    rank: int
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class TunedLens(nn.Module):
    """Translators for layers 1..N-1 of one model."""

    def __init__(self, n_layers: int, hidden: int, rank: int) -> None:
        """Identity translators (zero deltas and biases)."""
        super().__init__()
        self.n_layers, self.rank = n_layers, rank
        count = n_layers - 1
        self.U = nn.Parameter(torch.zeros(count, hidden, rank))
        self.V = nn.Parameter(torch.zeros(count, rank, hidden))
        self.bias = nn.Parameter(torch.zeros(count, hidden))

    def translate(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """T_layer of (..., H) states of slow layer `layer` (1..N); layer N is unchanged."""
        if layer >= self.n_layers:
            return states
        index = layer - 1
        u, v, c = (t.to(states.dtype) for t in (self.U[index], self.V[index], self.bias[index]))
        return states + (states @ v.T) @ u.T + c

    def translate_stack(self, states: torch.Tensor) -> torch.Tensor:
        """T_l of a (N, ..., H) stack of the states of layers 1..N, all at once."""
        inner = states[:-1]
        flat = inner.reshape(inner.shape[0], -1, inner.shape[-1])  # (N-1, P, H)
        u, v, c = (t.to(states.dtype) for t in (self.U, self.V, self.bias))
        moved = flat + torch.bmm(torch.bmm(flat, v.transpose(1, 2)), u.transpose(1, 2)) + c[:, None]
        return torch.cat([moved.reshape(inner.shape), states[-1:]])

    def logits(self, parts: DecoderParts, layer: int, states: torch.Tensor) -> torch.Tensor:
        """Tuned-lens logits W_U LN_f(T_layer(h)) of (..., H) states of one slow layer."""
        return parts.lm_head(parts.norm(self.translate(layer, states)))

    def save(self, folder: Path, card: LensCard) -> None:
        """Write the translators (bf16) and the card into folder, atomically."""
        artifacts.save(folder, LENS_FILE, {k: v.to(torch.bfloat16) for k, v in
                                           self.state_dict().items()}, LENS_CARD, asdict(card))


def load_tuned_lens(folder: Path, parts: DecoderParts, model_name: str, model_fingerprint: str
                    ) -> tuple[TunedLens, LensCard] | None:
    """The tuned lens in folder, None when there is none; AdapterError when it belongs to
    another model or its files are corrupt.
    """
    folder = Path(folder)
    if not (folder / LENS_CARD).is_file():
        return None
    card, raw = artifacts.read_record(folder, LENS_CARD, LensCard, "tuned-lens", TRAIN_LENS)
    artifacts.check_model(raw, folder, "tuned-lens translators", model_name, model_fingerprint,
                          layers=(card.n_layers, parts.n_layers))
    tensors = artifacts.load_tensors(folder, LENS_FILE, "tuned-lens", TRAIN_LENS)
    return artifacts.fill(TunedLens(card.n_layers, card.hidden_size, card.rank), tensors,
                          folder, "tuned-lens", TRAIN_LENS), card
