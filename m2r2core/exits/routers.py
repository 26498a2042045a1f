"""Exit rules behind one interface: ARLA (an attentive router over the residual's layer
trajectory plus logit-lens features) and its baselines — softmax confidence (CALM-style),
entropy, hidden-state saturation, a static exit layer, and an MLP on the current state.

Every rule scores a token's state at depth d in [0, 1]; a token exits at the first depth
d >= min_layer whose score reaches the threshold (or, where the rule names its check depths, the
first of those). Every rule works on the fast and the slow
stream; the heuristic ones also on the `tuned` stream (slow states through the tuned lens).

Lens features come from a check head: the LM head restricted to the most frequent tokens of the
training answers (`check_vocab`, a parameter; 0 = the full vocabulary). On this CPU the full head
costs about three blocks, so checking every layer with it would eat the savings; the emitted token
always comes from the full head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.errors import AdapterError, require
from m2r2core.runtime.hf_compat import DecoderParts

RULES = ("arla", "mlp", "confidence", "entropy", "saturation", "static")
LEARNED = ("arla", "mlp")
STREAMS = ("fast", "slow", "tuned")
"""Where a rule reads states: the accelerated stream, the slow stream, or the slow stream read
through the tuned lens (T_l(h_l); only the heuristic rules, the routers are not trained on it)."""
RULE_LABELS = {
    "arla": "ARLA (attentive router over the layer trajectory)",
    "mlp": "MLP on the current state",
    "confidence": "softmax confidence (CALM-style)",
    "entropy": "low entropy",
    "saturation": "hidden-state saturation (cos of consecutive layers)",
    "static": "static exit layer (threshold x depth)",
}
N_LENS_FEATURES = 3
ROUTER_FILE = "routers.safetensors"
ROUTER_CARD = "routers.json"
TRAIN_ROUTERS = "python -m m2r2core.train routers"


@dataclass(frozen=True)
class ExitRule:
    """When a token may leave: rule, stream, threshold and the earliest depth allowed."""

    rule: str = "arla"
    stream: str = "fast"
    threshold: float = 0.9
    min_layer: int = 4
    depths: tuple[int, ...] = ()
    """The only depths where the rule may decide (each also >= min_layer); empty: every depth
    from min_layer. A check costs time whether or not it fires, so a rule checked only where the
    stream is trained to be read (the fast stream's KL depths) pays for fewer checks."""

    def __post_init__(self) -> None:
        """Depths as a sorted tuple: a rule read back from JSON carries a list, and equal sets
        of depths compare equal.
        """
        object.__setattr__(self, "depths", tuple(sorted(set(self.depths))))

    def decides(self, depth: int) -> bool:
        """Whether the rule is asked to decide at `depth`."""
        return depth >= self.min_layer and (not self.depths or depth in self.depths)

    def validate(self, max_depth: int) -> None:
        """Raise ConfigError unless every field is in range for a stream of max_depth layers."""
        require(self.rule in RULES, "rule", self.rule, f"one of {RULES}")
        require(self.stream in STREAMS, "stream", self.stream, f"one of {STREAMS}")
        require(isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0,
                "threshold", self.threshold, "0 to 1 (scores are probabilities or cosines)")
        require(1 <= self.min_layer <= max_depth, "min_layer", self.min_layer,
                f"1..{max_depth}")
        require(all(isinstance(d, int) and self.min_layer <= d <= max_depth
                    for d in self.depths), "depths", self.depths,
                f"depths from the minimum layer {self.min_layer} to {max_depth}")


class CheckHead(nn.Module):
    """Logit-lens features from a sub-vocabulary head: top-1 prob, normalised entropy, margin."""

    def __init__(self, parts: DecoderParts, token_ids: torch.Tensor | None) -> None:
        """token_ids: the sub-vocabulary (None: the full head)."""
        super().__init__()
        self.norm = parts.norm
        weight = parts.lm_head.weight
        self.register_buffer("token_ids", token_ids if token_ids is not None else
                             torch.arange(weight.shape[0]), persistent=False)
        self.weight = weight if token_ids is None else weight[token_ids].clone()
        self.log_size = math.log(self.weight.shape[0])

    def features(self, normed: torch.Tensor) -> torch.Tensor:
        """(..., 3) float features of (..., H) normed states."""
        logits = F.linear(normed, self.weight).float()
        logp = F.log_softmax(logits, dim=-1)
        top2 = logp.topk(2, dim=-1).values.exp()
        entropy = -(logp.exp() * logp).sum(-1) / self.log_size
        return torch.stack([top2[..., 0], 1.0 - entropy, top2[..., 0] - top2[..., 1]], dim=-1)


class RouterNet(nn.Module):
    """A learned exit router. kind='arla': each state up to depth d is projected to a latent plus
    a depth embedding; the newest attends over the earlier ones; the context, the newest latent
    and the lens features go through an MLP to P(exit at d is correct). kind='mlp': an MLP on the
    newest state only.
    """

    def __init__(self, kind: str, hidden: int, max_depth: int, latent: int = 64) -> None:
        """An untrained router for states of width `hidden`, depths 1..max_depth."""
        super().__init__()
        self.kind, self.max_depth = kind, max_depth
        self.proj = nn.Linear(hidden, latent)
        if kind == "arla":
            self.depth_embed = nn.Embedding(max_depth + 1, latent)
            self.query = nn.Linear(latent, latent, bias=False)
            self.key = nn.Linear(latent, latent, bias=False)
            self.value = nn.Linear(latent, latent, bias=False)
            width = 2 * latent + N_LENS_FEATURES
        else:
            width = latent
        self.head = nn.Sequential(nn.Linear(width, latent), nn.GELU(), nn.Linear(latent, 1))

    def forward(self, normed: torch.Tensor, lens: torch.Tensor | None, depths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every depth of a batch of trajectories, and ARLA's attention weights.

        Args:
            normed: (P, D, H) normed states at depths `depths`.
            lens: (P, D, 3) lens features (ARLA only; the MLP takes None).
            depths: (D,) the depth of each column.

        Returns:
            (P, D) logits; (P, D, D) attention over earlier depths (None for the MLP).
        """
        z = self.proj(normed.float())
        if self.kind != "arla":
            return self.head(F.gelu(z)).squeeze(-1), None
        z = z + self.depth_embed(depths)[None]
        scores = self.query(z) @ self.key(z).transpose(1, 2) / math.sqrt(z.shape[-1])
        causal = torch.ones(len(depths), len(depths), dtype=torch.bool,
                            device=z.device).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        context = weights @ self.value(z)
        out = self.head(torch.cat([z, context, lens.float()], dim=-1)).squeeze(-1)
        return out, weights


@dataclass
class RouterCard:
    """What routers.json says: the model, the check head and each router's validation metrics."""

    model_name: str
    model_fingerprint: str
    check_vocab: int
    max_depth: dict
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class RouterBundle:
    """The check head plus the learned routers per stream (keys like 'arla/fast')."""

    def __init__(self, parts: DecoderParts, check_ids: torch.Tensor | None,
                 nets: dict[str, RouterNet], card: RouterCard | None = None) -> None:
        """Bundle trained (or untrained) routers with the model's check head."""
        self.check = CheckHead(parts, check_ids)
        self.nets = nets
        self.card = card

    def net(self, rule: str, stream: str) -> RouterNet:
        """The learned router for a rule and stream, or AdapterError if it was not trained."""
        key = f"{rule}/{stream}"
        if key not in self.nets:
            raise AdapterError(f"No trained '{rule}' router for the {stream} stream; train "
                               "routers with `python -m m2r2core.train routers`.")
        return self.nets[key]

    def save(self, folder: Path) -> None:
        """routers.safetensors and routers.json, written atomically."""
        tensors = {"check_ids": self.check.token_ids.to(torch.int32)}
        for key, net in self.nets.items():
            tensors |= {f"{key}/{name}": t.float() for name, t in net.state_dict().items()}
        artifacts.save(folder, ROUTER_FILE, tensors, ROUTER_CARD, asdict(self.card))


def load_routers(folder: Path, parts: DecoderParts, model_name: str, model_fingerprint: str
                 ) -> RouterBundle:
    """Load routers trained for this model; AdapterError for another model or a corrupt file."""
    folder = Path(folder)
    card, raw = artifacts.read_record(folder, ROUTER_CARD, RouterCard, "router", TRAIN_ROUTERS)
    artifacts.check_model(raw, folder, "routers", model_name, model_fingerprint)
    tensors = artifacts.load_tensors(folder, ROUTER_FILE, "router", TRAIN_ROUTERS)
    try:
        hidden = parts.config.hidden_size
        nets = {}
        for key, depth in card.max_depth.items():
            kind = key.split("/")[0]
            net = RouterNet(kind, hidden, depth)
            prefix = key + "/"
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                 if k.startswith(prefix)})
            nets[key] = net.eval()
        check_ids = tensors["check_ids"].long()
    except (RuntimeError, KeyError) as err:
        raise AdapterError(f"The router weights in {folder} could not be loaded ({err}); rerun "
                           f"`{TRAIN_ROUTERS}` or restore them.") from err
    return RouterBundle(parts, check_ids if card.check_vocab else None, nets, card)


def rule_scores(bundle: RouterBundle, parts: DecoderParts, rule: str, stream: str,
                states: torch.Tensor, previous: torch.Tensor, depths: torch.Tensor,
                max_depth: int, normed: torch.Tensor | None = None,
                lens: torch.Tensor | None = None) -> torch.Tensor:
    """One exit rule's scores at every column of recorded trajectories: the one implementation
    of each rule, used by decoding (TokenScorer) and by the debugger's re-decisions alike.

    Args:
        stream: 'fast' or 'slow' (which learned routers apply).
        states: (T, D, H) states at depths `depths` of T tokens. ARLA attends over every column,
            so its columns must be the trajectory from depth 1 on.
        previous: (T, H) the state just before the first column (saturation's reference).
        depths: (D,) the depth of each column.
        max_depth: the stream's deepest depth (the static rule's denominator).
        normed: (T, D, H) the states through the final norm, when the caller has them.
        lens: (T, D, 3) their lens features, when the caller has them.

    Returns:
        (T, D) float scores.
    """
    if rule == "static":
        return (depths.float() / max_depth)[None].expand(states.shape[0], -1)
    if rule == "saturation":
        before = torch.cat([previous[:, None], states[:, :-1]], dim=1)
        return F.cosine_similarity(states.float(), before.float(), dim=-1)
    normed = parts.norm(states) if normed is None else normed
    if rule == "mlp":  # the state alone: no lens features (a sub-vocabulary head) to pay for
        return torch.sigmoid(bundle.net(rule, stream)(normed, None, depths)[0])
    lens = bundle.check.features(normed) if lens is None else lens  # (T, D, 3)
    if rule in ("confidence", "entropy"):
        return lens[..., 0 if rule == "confidence" else 1]
    logits, _ = bundle.net(rule, stream)(normed, lens, depths)
    return torch.sigmoid(logits)


class TokenScorer:
    """Scores one token's states depth by depth, keeping the trajectory ARLA attends over.

    Call `step` at every depth from 1 (ARLA attends over the whole trajectory so far, as in
    training); it returns a score only where the rule is asked to decide, computed by
    `rule_scores` on the newest column (on the whole trajectory for ARLA).
    """

    def __init__(self, bundle: RouterBundle, rule: ExitRule, max_depth: int, parts: DecoderParts
                 ) -> None:
        """Start a token; `max_depth` is the deepest depth of the chosen stream."""
        self.bundle, self.rule, self.max_depth, self.parts = bundle, rule, max_depth, parts
        if rule.rule in LEARNED:
            bundle.net(rule.rule, rule.stream)  # AdapterError now, not mid-run
        self.states: list[torch.Tensor] = []
        self.normed: list[torch.Tensor] = []
        """ARLA: each observed state through the final norm, computed once."""
        self.depths: list[int] = []
        self.before: torch.Tensor | None = None

    def start(self, state: torch.Tensor) -> None:
        """The (H,) state at depth 0 of the stream (embedding or branch state): saturation's
        reference at depth 1, as in `scores_offline`.
        """
        self.before = state

    @torch.inference_mode()
    def step(self, state: torch.Tensor, depth: int, decide: bool) -> float | None:
        """Observe the (H,) state at `depth`; when `decide`, return the rule's score there."""
        previous = self.states[-1] if self.states else self.before
        if previous is None:
            previous = state
        self.states.append(state)
        self.depths.append(depth)
        arla = self.rule.rule == "arla"
        if arla:
            self.normed.append(self.parts.norm(state))
        if not decide:
            return None
        if not arla:
            return float(rule_scores(self.bundle, self.parts, self.rule.rule, self.rule.stream,
                                     state[None, None], previous[None], torch.tensor([depth]),
                                     self.max_depth)[0, 0])
        # ARLA attends over every depth's latent, but a depth's lens features enter only its own
        # row of the head (RouterNet.forward), so the newest row's are the only ones needed.
        normed = torch.stack(self.normed)[None]  # (1, d, H)
        lens = torch.zeros(1, len(self.normed), N_LENS_FEATURES, device=normed.device)
        lens[0, -1] = self.bundle.check.features(normed[0, -1])
        scores = rule_scores(self.bundle, self.parts, "arla", self.rule.stream,
                             torch.stack(self.states)[None], state[None],
                             torch.tensor(self.depths), self.max_depth, normed, lens)
        return float(scores[0, -1])


def scores_offline(bundle: RouterBundle, parts: DecoderParts, stream: str, states: torch.Tensor,
                   previous0: torch.Tensor) -> dict:
    """Every rule's score at every depth of recorded trajectories (for the debugger's slider).

    Args:
        stream: 'fast' or 'slow' (which learned routers apply).
        states: (T, D, H) states at depths 1..D of T tokens.
        previous0: (T, H) the state at depth 0 (saturation's reference).

    Returns:
        {rule: (T, D) float scores} for the rules available in the bundle.
    """
    max_depth = states.shape[1]
    depths = torch.arange(1, max_depth + 1)
    available = [r for r in RULES if r not in LEARNED or f"{r}/{stream}" in bundle.nets]
    with torch.inference_mode():
        return {rule: rule_scores(bundle, parts, rule, stream, states, previous0, depths,
                                  max_depth).float().cpu() for rule in available}
