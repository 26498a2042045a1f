"""The accelerated (fast) residual stream: low-rank accelerator adapters on the first blocks, and
the block math that runs fast rows beside slow rows while sharing the slow stream's KV cache.

Fast depth d (1-based) has applied blocks b..d-1 with adapters on, starting from the slow state
h^s_b at the branch layer b. It is trained so that h^f_d ~ h^s_tau(d), tau(d) = min(N, b +
ceil(r (d - b))). A fast query at block i sees the slow keys/values of block i for earlier
positions plus its own key/value for the current position; it never writes the slow cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.errors import AdapterError, ConfigError, require
from m2r2core.runtime import hf_compat
from m2r2core.runtime.hf_compat import BlockParts, DecoderParts
from m2r2core.stream.blocks import (
    FoldedAdapters,
    FusedAdapters,
    block_rows,
    keys_values,
    merged_block,
    visible,
)

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TARGETS = ("rate", "final")
BLOCK_CHOICES = ("same", "rate")
KV_CHOICES = ("shared", "own")
CARD_NAME = "card.json"
WEIGHTS_NAME = "adapters.safetensors"
TRAIN_ADAPTERS = "python -m m2r2core.train adapters"


@dataclass(frozen=True)
class AccelConfig:
    """Shape of the accelerated stream. Every field is a choice our reading of the method made."""

    rate: float = 2.0
    """r: fast depth d should look like slow depth r*d."""
    rank: int = 16
    alpha: float = 32.0
    margin: int = 2
    """Adapted blocks beyond ceil((N-b)/r), where the fast stream already targets h^s_N."""
    branch_layer: int = 0
    """b: the fast stream starts from the slow state after b blocks (0 = the embedding)."""
    target: str = "rate"
    """'rate': h^f_d ~ h^s_tau(d); 'final': every fast depth targets h^s_N."""
    projections: tuple[str, ...] = PROJECTIONS
    bias: bool = False
    """Also learn a bias on each adapted block's MLP output (the fast residual's update): a
    constant shift the fast stream can make without spending adapter rank (why it helps on
    SmolLM2 is in the README)."""
    blocks: str = "same"
    """Which base block fast depth d runs. 'same': block d (the method note's reading).
    'rate': block tau(d), reading that block's slow cache, so the fast stream runs every r-th
    block of the model with adapters (a training-study variant; decoding supports 'same')."""
    kv: str = "shared"
    """'shared': fast queries read the slow stream's keys/values of earlier positions (the
    method's shared cache). 'own': the fast stream attends to its own keys/values of every
    position (a separate cache; a training-study variant; decoding supports 'shared')."""

    def validate(self, n_layers: int) -> None:
        """Raise ConfigError unless this shape makes sense for a model of n_layers blocks."""
        require(self.target in TARGETS, "target", self.target, f"one of {TARGETS}")
        require(self.blocks in BLOCK_CHOICES, "blocks", self.blocks, f"one of {BLOCK_CHOICES}")
        require(self.kv in KV_CHOICES, "kv", self.kv, f"one of {KV_CHOICES}")
        require(0 <= self.branch_layer < n_layers, "branch_layer", self.branch_layer,
                f"0..{n_layers - 1} for a {n_layers}-layer model")
        span = n_layers - self.branch_layer
        require(1.0 < self.rate <= span / 2, "rate", self.rate,
                f"above 1 and at most {span / 2:g}, so that at least two adapted blocks reach "
                f"the final state of a {n_layers}-layer model branching at layer "
                f"{self.branch_layer}")
        require(1 <= self.rank <= 256, "rank", self.rank, "1..256")
        require(self.margin >= 0, "margin", self.margin, "0 or more")
        unknown = set(self.projections) - set(PROJECTIONS)
        require(not unknown and bool(self.projections), "projections", self.projections,
                f"a non-empty subset of {PROJECTIONS}")

    def fast_layers(self, n_layers: int) -> int:
        """How many blocks the fast stream runs (and carries adapters): ceil((N-b)/r)+margin."""
        span = n_layers - self.branch_layer
        return min(span, math.ceil(span / self.rate) + self.margin)

    @property
    def decodable(self) -> bool:
        """Whether the decoding paths (exits, drafting, tracing) implement this shape."""
        return self.blocks == "same" and self.kv == "shared"

    def base_block(self, depth: int, n_layers: int) -> int:
        """The index of the base block that fast depth `depth` (1-based) runs."""
        return depth - 1 if self.blocks == "same" else self.target_depth(depth, n_layers) - 1

    def target_depth(self, depth: int, n_layers: int) -> int:
        """tau(d): the slow depth fast depth d is trained to match."""
        if self.target == "final":
            return n_layers
        b = self.branch_layer
        return min(n_layers, b + math.ceil(self.rate * (depth - b) - 1e-9))


class LowRank(nn.Module):
    """delta(x) = (alpha / rank) * B A x (+ bias); B and the bias start at zero (LoRA).

    `dropout`: the share of the input's features zeroed (and the rest scaled up) while the
    module is training; a regulariser of training only (inference and evaluation never drop).
    """

    dropout: float = 0.0

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, bias: bool = False) -> None:
        """A fresh adapter whose delta is exactly zero."""
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta for (..., in) inputs, computed in the input's dtype."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        out = F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        return out if self.bias is None else out + self.bias.to(x.dtype)


@dataclass
class AdapterCard:
    """What the JSON card beside the adapters says: shape, model, training data and metrics."""

    config: dict
    model_name: str
    model_fingerprint: str
    n_layers: int
    hidden_size: int
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class Accelerator(nn.Module):
    """The accelerator adapters of one model: a LowRank per adapted block and projection."""

    def __init__(self, parts: DecoderParts, config: AccelConfig, seed: int = 0) -> None:
        """Fresh (zero-delta) adapters sized for the model behind `parts`."""
        super().__init__()
        config.validate(parts.n_layers)
        self.config = config
        self.n_layers = parts.n_layers
        self.n_fast = config.fast_layers(parts.n_layers)
        self.first = config.branch_layer
        gen = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList()
        for depth in self.depths:
            bp = hf_compat.block_parts(parts, config.base_block(depth, self.n_layers))
            linears = {"q": bp.q_proj, "k": bp.k_proj, "v": bp.v_proj, "o": bp.o_proj}
            if bp.mlp_proj is not None:
                linears |= dict(zip(("gate", "up", "down"), bp.mlp_proj, strict=True))
            self.blocks.append(nn.ModuleDict({
                name: LowRank(lin.in_features, lin.out_features, config.rank, config.alpha, gen,
                              bias=config.bias and name == "down")
                for name, lin in linears.items() if name in config.projections
            }))

    def block(self, index: int) -> nn.ModuleDict | None:
        """The adapters of decoder block `index`, or None where the fast stream does not run."""
        offset = index - self.first
        return self.blocks[offset] if 0 <= offset < self.n_fast else None

    def inference_block(self, index: int, bp: BlockParts | None = None
                        ) -> FusedAdapters | None:
        """The fused adapters of block `index` for decoding (built once per dtype and device of
        the adapters and of `bp`'s weights). With `bp`, the block's own projections: the A
        matrices are folded into them (FoldedAdapters; a copy of the block's weights).
        """
        offset = index - self.first
        if not 0 <= offset < self.n_fast:
            return None
        cache = self.__dict__.setdefault("_fused", {})
        a = next(iter(self.blocks[offset].values())).A
        key = (offset, None if bp is None else (bp.q_proj.weight.dtype, id(bp.q_proj.weight)))
        if key not in cache or cache[key][0] != (a.dtype, a.device):
            fused = (FusedAdapters(self.blocks[offset]) if bp is None
                     else FoldedAdapters(self.blocks[offset], bp))
            cache[key] = ((a.dtype, a.device), fused)
        return cache[key][1]

    def merged_block(self, index: int, bp: BlockParts) -> BlockParts:
        """Block `index` with its adapters folded into the weights (built once; see
        stream.blocks.merged_block).
        """
        cache = self.__dict__.setdefault("_merged", {})
        key = (index, bp.q_proj.weight.dtype, bp.q_proj.weight.device)
        if key not in cache:
            cache[key] = merged_block(bp, self.block(index))
        return cache[key]

    @property
    def depths(self) -> range:
        """Fast depths d = b+1 .. b+n_fast, in the slow stream's layer numbering."""
        return range(self.first + 1, self.first + self.n_fast + 1)

    @property
    def max_depth(self) -> int:
        """The deepest fast depth, b + n_fast: how far the fast stream reaches."""
        return self.first + self.n_fast

    def save(self, folder: Path, card: AdapterCard) -> None:
        """Write adapters.safetensors and card.json into folder, atomically (temp, then rename)."""
        artifacts.save(folder, WEIGHTS_NAME,
                       {k: v.to(torch.bfloat16) for k, v in self.state_dict().items()},
                       CARD_NAME, asdict(card))


def find_trained(model_fingerprint: str, root: Path | None = None) -> Path | None:
    """The folder whose adapters were trained for this model, if any: under $M2R2_TRAINED_DIR
    when set, else the committed artifacts/ folder (m2r2core/artifacts.py).
    """
    root = root or artifacts.artifacts_dir()
    for card_path in sorted(Path(root).glob(f"*/{CARD_NAME}")):
        try:
            if json.loads(card_path.read_text()).get("model_fingerprint") == model_fingerprint:
                return card_path.parent
        except (json.JSONDecodeError, OSError):
            continue
    return None


def read_card(folder: Path) -> AdapterCard:
    """The card of an adapter folder, or AdapterError naming what is wrong."""
    return artifacts.read_record(folder, CARD_NAME, AdapterCard, "adapter", TRAIN_ADAPTERS)[0]


def load_accelerator(folder: Path, parts: DecoderParts, model_name: str,
                     model_fingerprint: str) -> tuple[Accelerator, AdapterCard]:
    """Load adapters trained for this model, refusing those of another model or a corrupt file."""
    folder = Path(folder)
    card = read_card(folder)
    artifacts.check_model(asdict(card), folder, "adapters", model_name, model_fingerprint,
                          layers=(card.n_layers, parts.n_layers))
    try:
        config = AccelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in card.config.items()})
    except (TypeError, ConfigError) as err:
        raise AdapterError(f"The adapter card in {folder} is corrupt ({err}); rerun "
                           f"`{TRAIN_ADAPTERS}` or restore it.") from err
    tensors = artifacts.load_tensors(folder, WEIGHTS_NAME, "adapter", TRAIN_ADAPTERS)
    return artifacts.fill(Accelerator(parts, config), tensors, folder, "adapter",
                          TRAIN_ADAPTERS), card


def train_fast_states(parts: DecoderParts, accel: Accelerator, slow: list[torch.Tensor],
                      rotary: tuple[torch.Tensor, torch.Tensor], local: bool = False
                      ) -> list[torch.Tensor]:
    """Fast states of every position in parallel, with the inference attention pattern.

    Args:
        slow: h^s_0..h^s_N, each (B, T, H), computed without gradients.
        rotary: (cos, sin), each (B, T, D), for positions 0..T-1.
        local: feed each fast block the slow state its input depth targets (h^s_tau(d-1))
            instead of the previous fast state: block-by-block training, no chain.

    Returns:
        h^f at depths b+1..b+n_fast, each (B, T, H), differentiable w.r.t. the adapters.
    """
    cos, sin = rotary
    steps = slow[0].shape[1]
    pos = torch.arange(steps, device=slow[0].device)
    config, n = accel.config, accel.n_layers
    # Fast query t: slow keys of positions < t and its own key (the diagonal of the rows), or,
    # with its own cache, the fast keys of every position up to t (rows attend to rows).
    own = config.kv == "own"
    states, hidden = [], slow[accel.first]
    for offset, depth in enumerate(accel.depths):
        index = config.base_block(depth, n)
        bp = hf_compat.block_parts(parts, index)
        if local and offset:
            hidden = slow[config.target_depth(depth - 1, n)]
        if own:
            past_k = past_v = None
            mask = visible(pos, pos, bp.sliding_window)
        else:
            with torch.no_grad():
                past_k, past_v = keys_values(bp, slow[index], cos, sin)
            mask = torch.cat([visible(pos, pos, bp.sliding_window, strict=True),
                              torch.eye(steps, dtype=torch.bool, device=pos.device)], dim=1)
        hidden, _, _ = block_rows(bp, accel.blocks[offset], hidden, cos, sin, past_k, past_v,
                                  mask, n_fast=steps)
        states.append(hidden)
    return states


def fast_trajectory(parts: DecoderParts, accel: Accelerator, start: torch.Tensor, cache,
                    position: int) -> list[torch.Tensor]:
    """The fast stream of one position over the slow cache of the positions before it.

    Args:
        start: (1, 1, H) the slow state h^s_b of this position at the branch layer.
        cache: the slow KV cache; entries at `position` or later are ignored, so it may already
            hold this position. (A sliding-window layer that already holds it has evicted the
            oldest key the fast query would see: the one approximation of this function.)
        position: the absolute position of this token.

    Returns:
        h^f at depths b+1..b+n_fast, each (1, 1, H).
    """
    positions = torch.tensor([[position]], device=start.device)
    cos, sin = parts.rotary_emb(start, positions)
    hidden, states = start, []
    for index in range(accel.first, accel.first + accel.n_fast):
        bp = hf_compat.block_parts(parts, index)
        keys, values = hf_compat.cached_keys_values(cache, index)
        stored = 0 if keys is None else keys.shape[2]
        total = hf_compat.cached_length(cache, index)
        # A sliding-window layer keeps only its newest entries.
        key_pos = torch.arange(total - stored, total, device=start.device)
        mask = torch.cat([visible(positions[0], key_pos, bp.sliding_window, strict=True),
                          torch.ones(1, 1, dtype=torch.bool, device=start.device)], dim=1)
        hidden, _, _ = block_rows(bp, accel.inference_block(index, bp), hidden, cos, sin, keys,
                                  values, mask, n_fast=1)
        states.append(hidden)
    return states
