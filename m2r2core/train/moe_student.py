"""The MoE student of the distillation: a dense Llama MLP's frozen weights run either as the dense
MLP (the teacher) or as the MoE layer `moefy.build` writes (shared neurons plus the router's top-k
experts, weighted as Qwen2-MoE weights them), with a trainable router and either low-rank
corrections of the gate, up and down projections or (full) those projections' own weights; and
the loss that compares their distributions.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from m2r2core.moe import distilled
from m2r2core.moe.moefy import MoeCard


class SparseMLP(nn.Module):
    """One MoE layer for training: the dense MLP's frozen weights, run as the teacher or as the
    MoE student with a trainable router and low-rank corrections.
    """

    def __init__(self, mlp, down: torch.Tensor, shared: torch.Tensor, experts: torch.Tensor,
                 router: torch.Tensor, top_k: int, rank: int, seed: int, full: bool = False
                 ) -> None:
        """Args:
        mlp: the dense Llama MLP (its weights are read, not changed).
        down: (H, I) the MoEfication's refitted down projection.
        shared, experts: neuron indices of the shared expert and (E, I/E) of the experts.
        router: (E, H) the effective router logits weight the student starts from.
        rank: of each projection's correction (0 with full).
        full: train the gate, up and down weights themselves (float32 copies; the frozen ones
            stay the teacher's and the base the saved deltas are taken from).
        """
        super().__init__()
        dtype = mlp.gate_proj.weight.dtype
        self.register_buffer("w_gate", mlp.gate_proj.weight.detach())
        self.register_buffer("w_up", mlp.up_proj.weight.detach())
        self.register_buffer("w_down_dense", mlp.down_proj.weight.detach())
        self.register_buffer("w_down", down.to(dtype))
        n_experts, n_neurons = experts.shape[0], self.w_gate.shape[0]
        onehot = torch.zeros(n_experts, n_neurons)
        for e, idx in enumerate(experts.long()):
            onehot[e, idx] = 1.0
        shared_mask = torch.zeros(n_neurons)
        shared_mask[shared.long()] = 1.0
        self.register_buffer("onehot", onehot)
        self.register_buffer("shared_mask", shared_mask)
        self.top_k = top_k
        self.router_scale = float(router.abs().max()) or 1.0
        """The router is trained in units of its largest entry, so its learning rate is
        relative; the effective logits weight is router * router_scale."""
        self.router = nn.Parameter(router.detach().float() / self.router_scale)
        gen = torch.Generator().manual_seed(seed)
        hidden = self.w_gate.shape[1]
        shapes = {"gate": (n_neurons, hidden), "up": (n_neurons, hidden),
                  "down": (hidden, n_neurons)}
        self.full = full
        self.weights = nn.ParameterDict()
        """With full: the trained projections, in the dense model's neuron order."""
        if full:
            for name, base in self._bases().items():
                self.weights[name] = nn.Parameter(base.detach().float().clone())
        self.fix = nn.ParameterDict()
        for name, (out_dim, in_dim) in (() if full else shapes.items()):
            self.fix[f"{name}_a"] = nn.Parameter(torch.randn(rank, in_dim, generator=gen)
                                                 / math.sqrt(in_dim))
            self.fix[f"{name}_b"] = nn.Parameter(torch.zeros(out_dim, rank))
        self.teacher = False
        self.losses: dict[str, torch.Tensor] = {}

    def _bases(self) -> dict[str, torch.Tensor]:
        """The frozen projections the corrections (or full deltas) are added to."""
        return {"gate": self.w_gate, "up": self.w_up, "down": self.w_down}

    def _low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.fix[f"{name}_a"], self.fix[f"{name}_b"]
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def _project(self, x: torch.Tensor, name: str, base: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The student's projection `name` of x (`base`: the frozen one, already applied)."""
        if self.full:
            return F.linear(x, self.weights[name].to(x.dtype))
        if base is None:
            base = F.linear(x, self._bases()[name])
        return base + self._low_rank(x, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense MLP (teacher) or the MoE layer (student; its losses kept in .losses)."""
        gate, up = F.linear(x, self.w_gate), F.linear(x, self.w_up)
        if self.teacher:
            return F.linear(F.silu(gate) * up, self.w_down_dense)
        if self.full:
            gate, up = gate.detach(), up.detach()  # the teacher's, for the layer loss only
        act = F.silu(self._project(x, "gate", gate)) * self._project(x, "up", up)
        probs = F.softmax(F.linear(x.float(), self.router * self.router_scale), dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(
            -1, top.indices, top.values / top.values.sum(-1, keepdim=True) * self.top_k)
        kept = act * (self.shared_mask + weights @ self.onehot).to(act.dtype)
        out = self._project(kept, "down")
        if self.training:
            with torch.no_grad():
                target = F.linear(F.silu(gate) * up, self.w_down_dense).float()
            self.losses = {
                "local": (out.float() - target).pow(2).mean() / target.pow(2).mean(),
                "balance": probs.shape[-1] * ((weights > 0).float().flatten(0, -2).mean(0)
                                              / self.top_k
                                              * probs.flatten(0, -2).mean(0)).sum(),
            }
        return out

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """This layer's share of distilled.safetensors."""
        out = {f"layers.{layer}.router": self.router.detach().float() * self.router_scale}
        bases = self._bases()
        for name in distilled.PROJECTIONS:
            if self.full:
                out[f"layers.{layer}.{name}.delta"] = (self.weights[name].detach()
                                                       - bases[name].float())
            else:
                out[f"layers.{layer}.{name}.a"] = self.fix[f"{name}_a"].detach().clone()
                out[f"layers.{layer}.{name}.b"] = self.fix[f"{name}_b"].detach().clone()
        return out

    def load(self, tensors: dict[str, torch.Tensor], layer: int) -> None:
        """Start from a saved distillation (a full student takes low-rank corrections too,
        folded into its weights).
        """
        bases = self._bases()
        with torch.no_grad():
            self.router.copy_(tensors[f"layers.{layer}.router"] / self.router_scale)
            for name in distilled.PROJECTIONS:
                if self.full:
                    self.weights[name].copy_(distilled.corrected(bases[name].float(), tensors,
                                                                 layer, name))
                    continue
                if f"layers.{layer}.{name}.a" not in tensors:
                    raise ValueError("a full-weight distillation cannot start a low-rank one")
                self.fix[f"{name}_a"].copy_(tensors[f"layers.{layer}.{name}.a"])
                self.fix[f"{name}_b"].copy_(tensors[f"layers.{layer}.{name}.b"])


def wrap(model, card: MoeCard, tensors: dict[str, torch.Tensor], downs: dict[int, torch.Tensor],
         rank: int, seed: int, full: bool = False) -> dict[int, SparseMLP]:
    """Replace every MoE layer's MLP of the (frozen) dense model by a SparseMLP; {layer: it}."""
    sparse = {}
    for index, layer in enumerate(model.model.layers):
        if index in card.dense_layers:
            continue
        sparse[index] = SparseMLP(layer.mlp, downs[index], tensors[f"layers.{index}.shared"],
                                  tensors[f"layers.{index}.experts"],
                                  tensors[f"layers.{index}.router"].float() * card.router_scale,
                                  card.top_k, rank, seed + index, full)
        layer.mlp = sparse[index]
    return sparse


def set_teacher(sparse: dict[int, SparseMLP], teacher: bool) -> None:
    """Run every wrapped layer as the dense MLP (True) or as the MoE (False)."""
    for mlp in sparse.values():
        mlp.teacher = teacher


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, top: int = 64
            ) -> torch.Tensor:
    """Mean over the masked positions of KL(teacher || student) of two (..., V) logits, over the
    teacher's `top` tokens plus the rest lumped into one tail outcome (exact when the tail is
    empty, a lower bound otherwise; top <= 0: the full vocabulary). The full softmax over the
    vocabulary costs as much as the student's forward pass on a CPU; this costs two
    log-partitions and a gather.
    """
    if top <= 0:
        logp = F.log_softmax(student.float(), -1)
        logq = F.log_softmax(teacher.float(), -1)
        per = (logq.exp() * (logq - logp)).sum(-1)
        return (per * mask).sum() / mask.sum()
    with torch.no_grad():
        t = teacher.float()
        values, index = t.topk(top, -1)
        logq = values - torch.logsumexp(t, -1, keepdim=True)
        q = logq.exp()
        q_tail = (1 - q.sum(-1)).clamp_min(1e-9)
    logp = student.gather(-1, index).float() - torch.logsumexp(student.float(), -1,
                                                                keepdim=True)
    p_tail = (1 - logp.exp().sum(-1)).clamp_min(1e-9)
    per = (q * (logq - logp)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    return (per * mask).sum() / mask.sum()
