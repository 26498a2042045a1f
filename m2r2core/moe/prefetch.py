"""Expert predictors, one interface: which experts will layers l+1 … l+D need?

- `m2r2`: ahead-of-time loading from the accelerated residual. The state after block l goes
  through a rate accelerator (a trained low-rank update that moves it towards the deeper states),
  then through the routers of layers l+1 … l+D (each after its own post-attention norm); top-k plus
  a margin per layer.
- `pregate`: the same routers on the current slow state, unaccelerated (pre-gating).
- `previous`: the experts the previous token used at those layers.
- `oracle`: the experts this very run will use (known from a reference run with every expert
  resident; an upper bound, not a method).
- `none`: nothing is predicted; every miss is loaded on demand.

Our reading of the method had to choose how to build the fast residual for the MoE model: the
dense model's accelerated stream (issue 3) runs whole blocks and needs the dense MLPs, so here the
accelerated residual is a per-layer low-rank map trained on the MoE model's own states with M2R2's
objective specialised to routing (the accelerated state at layer l must route like the states of
layers l+1 … l+D). A second choice: one accelerated state per layer for every distance (`shared`,
the stream as the method has it), or one per distance d = 1 … D (`per-distance`: the state at
rate d; the default since the shared map, a compromise over distances, predicted the next layer
worse than plain pre-gating). Both fold into the same one-matrix prediction, so they cost the same
at run time. `PREDICTORS` lists the choices; the Expert Loading page says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from m2r2core import artifacts
from m2r2core.errors import ArtifactError, ConfigError

PREDICTORS = ("m2r2", "pregate", "previous", "oracle", "none")
ACCEL_FILE = "accelerator.safetensors"
ACCEL_CARD = "accelerator.json"
FIT_ACCEL = "python -m m2r2core.train.moe fit-accel"


@dataclass(frozen=True)
class MoeParts:
    """Per layer: the router weight, the post-attention norm, and the MoE's top-k."""

    routers: tuple[torch.Tensor | None, ...]
    """(E, H) router weights; None for a dense layer (e.g. Qwen2-MoE's mlp_only_layers)."""
    norms: tuple[torch.nn.Module, ...]
    top_k: int
    n_experts: int

    @property
    def n_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.routers)

    def is_moe(self, layer: int) -> bool:
        """Whether `layer` routes to experts."""
        return self.routers[layer] is not None

    def logits(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        """Router logits of `layer` for a residual state (..., H)."""
        return F.linear(self.norms[layer](state), self.routers[layer])


class RouteAccelerator(torch.nn.Module):
    """Per-layer low-rank rate accelerator f_l(h) = h + B_l A_l h; with `distances` D, one map
    per layer and distance, f_{l,d}(h) = h + B_{l,d} A_{l,d} h.
    """

    def __init__(self, n_layers: int, hidden: int, rank: int, distances: int = 0) -> None:
        """Zero-initialised: f is the identity (pre-gating) before training. distances 0: one
        map per layer for every distance (shared).
        """
        super().__init__()
        lead = (n_layers, distances) if distances else (n_layers,)
        self.a = torch.nn.Parameter(torch.randn(*lead, rank, hidden) / math.sqrt(hidden))
        self.b = torch.nn.Parameter(torch.zeros(*lead, hidden, rank))

    @property
    def distances(self) -> int:
        """D of a per-distance accelerator; 0 when one map serves every distance."""
        return self.a.shape[1] if self.a.dim() == 4 else 0

    def factors(self, layer: int, distance: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the map that predicts `distance` layers ahead of `layer` (the furthest
        trained one beyond D).
        """
        if not self.distances:
            return self.a[layer], self.b[layer]
        d = min(max(distance, 1), self.distances) - 1
        return self.a[layer, d], self.b[layer, d]

    def forward(self, layer: int, state: torch.Tensor, distance: int = 1) -> torch.Tensor:
        """The accelerated state of layer `layer` for a target `distance` layers ahead."""
        a, b = self.factors(layer, distance)
        return state + F.linear(F.linear(state, a.to(state.dtype)), b.to(state.dtype))


@dataclass(frozen=True)
class AccelCard:
    """What an accelerator was trained for and how well it predicts."""

    model_fingerprint: str
    rank: int
    lookahead: int
    tokens: int
    steps: int
    metrics: dict
    moe_files: str = ""
    """sha256 of the MoEfication file the MoE was built from (empty for other models)."""


def load_route_accelerator(folder: Path, fingerprint: str, model_name: str = "the loaded MoE"
                           ) -> tuple[RouteAccelerator, AccelCard]:
    """The committed route accelerator; ArtifactError for a missing or corrupt file, or one
    trained for another model.
    """
    folder = Path(folder)
    card, raw = artifacts.read_record(folder, ACCEL_CARD, AccelCard, "route accelerator", FIT_ACCEL)
    artifacts.check_model({"model_name": "the MoE it was fitted on"} | raw, folder,
                          "route accelerator", model_name, fingerprint)
    tensors = artifacts.load_tensors(folder, ACCEL_FILE, "route accelerator", FIT_ACCEL)
    if "a" not in tensors:
        raise ArtifactError(f"The route accelerator weights in {folder} are corrupt (no 'a'); "
                            f"rerun `{FIT_ACCEL}` or restore them.")
    shape = tensors["a"].shape
    if len(shape) not in (3, 4):
        raise ArtifactError(f"The route accelerator weights in {folder} are corrupt ('a' has "
                            f"shape {tuple(shape)}); rerun `{FIT_ACCEL}` or restore them.")
    n_layers, *distances, rank, hidden = shape
    return artifacts.fill(RouteAccelerator(n_layers, hidden, rank, *distances), tensors, folder,
                          "route accelerator", FIT_ACCEL), card


def save_route_accelerator(accel: RouteAccelerator, card: AccelCard, folder: Path) -> None:
    """Write the accelerator and its card, atomically."""
    artifacts.save(folder, ACCEL_FILE, {"a": accel.a, "b": accel.b}, ACCEL_CARD, asdict(card))


MARGIN_GAP = """A margin expert (beyond the top-k) is named only when its router logit is within
`gap` of the k-th expert's, in units of the standard deviation of that prediction's logits over
the experts: a guess where the router hesitates. None names every margin expert. Held-out states
of the committed accelerator (margin 1): gap 0.1 names an extra expert for about one layer in 8
and recovers a third of the misses (BENCHMARKS, session 31); only router predictors (m2r2,
pre-gating) have logits to gate."""


ROUTER_PREDICTORS = ("m2r2", "pregate")
"""The predictors that read routers, so have logits a margin gap can gate."""


def margin_kept(logits: torch.Tensor, best: torch.Tensor, top_k: int, gap: float
                ) -> torch.Tensor:
    """MARGIN_GAP on tensors: which of the picks `best` (values, most likely first, (..., W))
    of `logits` (..., E) are named; the top-k always are.
    """
    spread = logits.float().std(-1, keepdim=True)
    return (best[..., top_k - 1:top_k] - best).float() <= gap * spread


def check_margin_gap(gap: float | None) -> None:
    """ConfigError unless the gap is None or a finite number ≥ 0."""
    if gap is not None and not (math.isfinite(gap) and gap >= 0):
        raise ConfigError(f"Margin gap {gap} is out of range; choose a number of standard "
                          "deviations ≥ 0 (or none: every margin expert).")


class Predictor:
    """Base: `predict(layer, state)` after block `layer` returns {later layer: experts}."""

    name = "none"

    def __init__(self, moe: MoeParts, lookahead: int, margin: int,
                 margin_gap: float | None = None) -> None:
        """Lookahead D ≥ 1 layers ahead; margin extra experts per layer beyond the top-k;
        margin_gap: see MARGIN_GAP (None: every margin expert is named).
        """
        if lookahead < 1 or lookahead > moe.n_layers - 1:
            raise ConfigError(f"Lookahead {lookahead} is out of range; choose 1 to "
                              f"{moe.n_layers - 1} layers.")
        if margin < 0 or moe.top_k + margin > moe.n_experts:
            raise ConfigError(f"Margin {margin} is out of range; choose 0 to "
                              f"{moe.n_experts - moe.top_k}.")
        check_margin_gap(margin_gap)
        self.moe, self.lookahead, self.margin = moe, lookahead, margin
        self.margin_gap = margin_gap
        self.routes: list[list[list[int]]] = []
        """Per token, per layer, the experts used (the runtime appends)."""

    def targets(self, layer: int) -> list[int]:
        """The layers a prediction after block `layer` is for."""
        last = min(layer + self.lookahead, self.moe.n_layers - 1)
        return [t for t in range(layer + 1, last + 1) if self.moe.is_moe(t)]

    def predict(self, token: int, layer: int, state: torch.Tensor) -> dict[int, list[int]]:
        """{target layer: predicted experts, most likely first}."""
        return {}


class RouterPredictor(Predictor):
    """Routers of later layers applied to the (optionally accelerated) state."""

    def __init__(self, moe: MoeParts, lookahead: int, margin: int,
                 accel: RouteAccelerator | None = None, margin_gap: float | None = None) -> None:
        """With an accelerator, this is M2R2 ahead-of-time loading; without, pre-gating."""
        super().__init__(moe, lookahead, margin, margin_gap)
        self.accel = accel
        self.name = "m2r2" if accel is not None else "pregate"
        self._targets = [self.targets(layer) for layer in range(moe.n_layers)]
        self._maps = [self._fold(layer) for layer in range(moe.n_layers)]
        """Per layer, everything a prediction does folded into one matrix (or None)."""
        self._host = [None if m is None or m.device.type != "cpu" else m.float().numpy()
                      for m in self._maps]
        """The folded matrices as float32 arrays: on the CPU a prediction is a NumPy
        matrix-vector product and an argsort of a few rows, under 20 µs where the same
        three tensor ops cost 30-70 µs of dispatch (it runs after every block)."""

    @torch.inference_mode()
    def _fold(self, layer: int) -> torch.Tensor | None:
        """The later routers × their RMSNorm gains × the accelerator, as one (T·E, H) matrix.

        An RMSNorm divides the state by its RMS, a positive scalar that scales every router
        logit alike and so never changes a top-k; what is left is linear, so the accelerator
        (I + B A) and each target's gain and router multiply into a single matrix, and a
        prediction is one matrix-vector product instead of a norm, a low-rank update and a
        router per target. None when a norm is not a plain RMSNorm (the unfolded path runs).
        """
        targets = self._targets[layer]
        if not targets:
            return None
        rows = []
        for t in targets:
            norm = self.moe.norms[t]
            if "RMSNorm" not in type(norm).__name__ or "Gemma" in type(norm).__name__ \
                    or getattr(norm, "weight", None) is None:
                return None
            rows.append(self.moe.routers[t].float() * norm.weight.float()[None, :])
        if self.accel is not None:
            for i, t in enumerate(targets):
                a, b = (f.float() for f in self.accel.factors(layer, t - layer))
                rows[i] = rows[i] + (rows[i] @ b) @ a
        return torch.cat(rows).to(self.moe.routers[targets[0]].dtype)

    def predict(self, token: int, layer: int, state: torch.Tensor) -> dict[int, list[int]]:
        """Top-k plus margin of each target layer's router on the (accelerated) state."""
        targets = self._targets[layer]
        if not targets:
            return {}
        host = self._host[layer]
        if host is not None and state.device.type == "cpu":
            x = state.detach()
            logits = host @ (x if x.dtype == torch.float32 else x.float()).numpy()
            return self._pick_host(targets, logits.reshape(len(targets), -1))
        return self._predict_tensor(targets, layer, state)

    def _pick_host(self, targets: list[int], logits: np.ndarray) -> dict[int, list[int]]:
        """`_predict_tensor`'s choice, on a (T, E) array of logits."""
        width = self.moe.top_k + self.margin
        order = np.argsort(-logits, axis=1, kind="stable")[:, :width]
        if not self.margin or self.margin_gap is None:
            return dict(zip(targets, order.tolist(), strict=True))
        k, out = self.moe.top_k, {}
        for t, row, picked in zip(targets, logits.tolist(), order.tolist(), strict=True):
            mean = sum(row) / len(row)  # a few numbers: plain Python beats NumPy's calls
            spread = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
            cut = row[picked[k - 1]] - self.margin_gap * spread
            out[t] = picked[:k] + [e for e in picked[k:] if row[e] >= cut]
        return out

    @torch.inference_mode()
    def _predict_tensor(self, targets: list[int], layer: int, state: torch.Tensor
                        ) -> dict[int, list[int]]:
        """The prediction with tensor ops (a GPU state, or a norm that does not fold)."""
        width = self.moe.top_k + self.margin
        folded = self._maps[layer]
        if folded is not None:
            logits = torch.nn.functional.linear(state.to(folded.dtype), folded)
            logits = logits.view(len(targets), -1)
        elif self.accel is not None:
            logits = torch.stack([self.moe.logits(t, self.accel(layer, state, t - layer))
                                  for t in targets])
        else:
            logits = torch.stack([self.moe.logits(t, state) for t in targets])
        best = logits.topk(width)
        if not self.margin or self.margin_gap is None:
            return dict(zip(targets, best.indices.tolist(), strict=True))
        keep = margin_kept(logits, best.values, self.moe.top_k, self.margin_gap)
        return {t: [e for e, kept in zip(row, flags, strict=True) if kept]
                for t, row, flags in zip(targets, best.indices.tolist(), keep.tolist(),
                                         strict=True)}


class PreviousPredictor(Predictor):
    """The previous token's experts at the target layers."""

    name = "previous"

    def predict(self, token: int, layer: int, state: torch.Tensor) -> dict[int, list[int]]:
        """What token-1 used at layers l+1 … l+D."""
        if token == 0 or len(self.routes) < token:
            return {}
        last = self.routes[token - 1]
        return {t: list(last[t]) for t in self.targets(layer) if t < len(last)}


class OraclePredictor(Predictor):
    """The routing of a reference run of the same prompt (an upper bound)."""

    name = "oracle"

    def __init__(self, moe: MoeParts, lookahead: int, margin: int,
                 reference: list[list[list[int]]]) -> None:
        """reference: per token, per layer, the experts the all-resident run used."""
        super().__init__(moe, lookahead, margin)
        self.reference = reference

    def predict(self, token: int, layer: int, state: torch.Tensor) -> dict[int, list[int]]:
        """Exactly what this token will use."""
        if token >= len(self.reference):
            return {}
        return {t: list(self.reference[token][t]) for t in self.targets(layer)}


def make_predictor(name: str, moe: MoeParts, lookahead: int, margin: int,
                   accel: RouteAccelerator | None = None,
                   reference: list[list[list[int]]] | None = None,
                   margin_gap: float | None = None) -> Predictor:
    """A predictor by name; ConfigError for unknown names or missing ingredients. margin_gap
    (MARGIN_GAP) gates the router predictors' margin; the others have no logits to gate.
    """
    if name not in PREDICTORS:
        raise ConfigError(f"Unknown predictor '{name}'; choose one of {', '.join(PREDICTORS)}.")
    check_margin_gap(margin_gap)
    if name == "m2r2":
        if accel is None:
            raise ConfigError("The m2r2 predictor needs the trained accelerator of this model.")
        return RouterPredictor(moe, lookahead, margin, accel, margin_gap)
    if name == "pregate":
        return RouterPredictor(moe, lookahead, margin, margin_gap=margin_gap)
    if name == "previous":
        return PreviousPredictor(moe, lookahead, margin)
    if name == "oracle":
        if reference is None:
            raise ConfigError("The oracle predictor needs a reference run's routing.")
        return OraclePredictor(moe, lookahead, margin, reference)
    return Predictor(moe, lookahead, margin)


def recall_by_distance(predictions: list[tuple[int, int, int, list[int]]],
                       routes: list[list[list[int]]], lookahead: int) -> dict[int, float]:
    """Share of the experts actually used that were predicted, by lookahead distance.

    predictions: (token, made after layer, target layer, experts) records.
    """
    hits = {d: [0, 0] for d in range(1, lookahead + 1)}
    for token, layer, target, experts in predictions:
        if token >= len(routes):
            continue
        used = routes[token][target]
        d = target - layer
        hits[d][0] += len(set(used) & set(experts))
        hits[d][1] += len(used)
    return {d: (h / n if n else float("nan")) for d, (h, n) in hits.items()}


ACCEL_LOSSES = ("set", "rank")
"""Training objectives of the route accelerator: `set`, the cross-entropy of the router's softmax
against the used top-k set (uniform over it); `rank`, the Plackett-Luce likelihood of the used
experts in the gate's order (the first, then the second among the rest, …), which asks for the
used experts to be the top k, as a margin-0 prefetch needs."""


def fit_accelerator(moe: MoeParts, states: list[torch.Tensor], topk: list[torch.Tensor],
                    rank: int, lookahead: int, steps: int, seed: int, progress=None,
                    per_distance: bool = True, validation: int = 10, batch_tokens: int = 0,
                    lr: float = 2e-3, loss: str = "set") -> RouteAccelerator:
    """Train the rate accelerator: f_l(h_l) must route like the states of layers l+1 … l+D
    (per distance: f_{l,d}(h_l) like the state of layer l+d).

    Every `validation`-th token is kept out of training (0: none). A trained map is kept only
    where its top-k recall of the used experts on those tokens beats the plain state's;
    elsewhere it stays the identity, so m2r2 falls back to pre-gating where the accelerated
    state does not help (in practice: often one layer ahead).

    Args:
        states: per layer l, (T, H) block outputs h_l (any float dtype; bf16 halves the memory
            of a large fit, each batch is computed in fp32).
        topk: per layer l, (T, k) experts the MoE actually used, in the gate's order.
        batch_tokens: tokens per Adam step (0: every training token, full batch).
        loss: one of ACCEL_LOSSES.
    Router logits are divided by their scale on the text so the softmax is not flat.
    """
    if loss not in ACCEL_LOSSES:
        raise ConfigError(f"Unknown accelerator loss '{loss}'; choose one of "
                          f"{', '.join(ACCEL_LOSSES)}.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n_layers = moe.n_layers
    hidden = states[0].shape[1]
    accel = RouteAccelerator(n_layers, hidden, rank, lookahead if per_distance else 0)
    sample = slice(0, 8192)
    temperature = [float(moe.logits(t, states[t - 1][sample].float()).std())
                   if t and moe.is_moe(t) else 1.0 for t in range(n_layers)]
    held = (torch.arange(len(states[0])) % validation == 0) if validation else None
    train_rows = torch.arange(len(states[0])) if held is None else (~held).nonzero()[:, 0]
    for layer in range(n_layers - 1):
        targets = [t for t in range(layer + 1, min(layer + lookahead, n_layers - 1) + 1)
                   if moe.is_moe(t)]
        groups = [[t] for t in targets] if per_distance else [targets] if targets else []
        for group in groups:
            slot_a, slot_b = accel.factors(layer, group[0] - layer)
            a = slot_a.detach().clone().requires_grad_(True)  # this map alone: Adam's steps
            b = slot_b.detach().clone().requires_grad_(True)  # touch only its own entries
            opt = torch.optim.Adam([a, b], lr=lr)
            full = not batch_tokens or batch_tokens >= len(train_rows)
            if full:  # one batch for every step: gathered once
                rows, x = train_rows, states[layer][train_rows].float()
            for _ in range(steps):
                if not full:
                    rows = train_rows[torch.randint(len(train_rows), (batch_tokens,),
                                                    generator=generator)]
                    x = states[layer][rows].float()
                fast = x + F.linear(F.linear(x, a), b)
                total = sum(_route_loss(moe.logits(t, fast) / temperature[t], topk[t][rows],
                                        moe.n_experts, loss) for t in group)
                opt.zero_grad()
                total.backward()
                opt.step()
            if held is not None and not _beats_plain(moe, states[layer][held].float(),
                                                     a.detach(), b.detach(),
                                                     {t: topk[t][held] for t in group}):
                continue  # the plain state routes these tokens as well or better
            with torch.no_grad():
                slot_a.copy_(a)
                slot_b.copy_(b)
        if progress:
            progress(layer + 1, n_layers - 1)
    accel.requires_grad_(False)
    return accel


def _route_loss(logits: torch.Tensor, used: torch.Tensor, n_experts: int,
                loss: str) -> torch.Tensor:
    """The accelerator's objective for one target layer: (T, E) logits, (T, k) used experts."""
    logp = F.log_softmax(logits, -1)
    if loss == "set":
        goal = F.one_hot(used, n_experts).sum(1).float() / used.shape[1]
        return -(goal * logp).sum(-1).mean()
    total = logits.new_zeros(())  # Plackett-Luce: each used expert among those not yet taken
    taken = torch.zeros_like(logits, dtype=torch.bool)
    for i in range(used.shape[1]):
        pick = used[:, i:i + 1]
        total = total - (logits.gather(1, pick)[:, 0]
                         - torch.logsumexp(logits.masked_fill(taken, float("-inf")), -1)).mean()
        taken = taken.scatter(1, pick, True)
    return total


@torch.no_grad()
def _beats_plain(moe: MoeParts, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 used: dict[int, torch.Tensor]) -> bool:
    """Whether the map x + B A x recalls more of the used top-k experts than x itself."""
    fast = x + F.linear(F.linear(x, a), b)

    def recall(state: torch.Tensor) -> float:
        hits = [(moe.logits(t, state).topk(moe.top_k, -1).indices[:, :, None]
                 == u[:, None, :]).any(-1).float().mean() for t, u in used.items()]
        return float(torch.stack(hits).mean())

    return recall(fast) > recall(x)
