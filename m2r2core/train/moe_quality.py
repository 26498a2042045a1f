"""How good the MoE is, against the dense model it was cut from.

    python -m m2r2core.train.moe quality --report benchmarks/moe_quality.json

Measured in float32 on sets nothing was fitted, distilled or tuned on:
- perplexity on 60 held-out Wikipedia lead sections (moe.heldout_texts; the distillation chose
  its best state on other lead sections of the same split);
- greedy answers to the first 20 MT-Bench first turns, generated in one batch per model: ROUGE-L
  of each MoE's answer against the dense model's, and how much each answer repeats itself (the
  share of its 4-grams that occurred earlier in it; a looping answer scores near 1);
- router agreement: per MoE layer, the share of the oracle's top-k experts (largest output
  norm, of this MoE's own experts) that the router's top-k picks, on the perplexity texts.

Each MoE is the plain MoEfication and, when there is one, the distillation; the figures also go
into the distilled card, which the Expert Loading page shows.

`--split tuning` measures the same on sets that may be used to choose between MoEs: the
distillation's dev lead sections (moe_distill.dev_texts) and the prompts of the distillation
corpus's dev split (instructions no train answer came from). It never writes the card.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from m2r2core.train.distill import eos_ids, greedy_answers, left_padded

log = logging.getLogger(__name__)


def repetition(ids: list[int], n: int = 4) -> float:
    """Share of an answer's n-grams that already occurred earlier in it (0: none repeats)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def batched_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers to chat prompts, generated in one left-padded batch; cut at EOS."""
    from m2r2core.runtime import prompt as prompt_mod

    rows = [prompt_mod.encode(tokenizer, text, True, None) for text in prompts]
    return answers_to_ids(model, tokenizer, rows, max_new_tokens)


def answers_to_ids(model, tokenizer, rows: list[list[int]], max_new_tokens: int
                   ) -> list[list[int]]:
    """Greedy answers to already-templated prompt ids, in one left-padded batch; cut at EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = eos_ids(model)
    return [answer[:-1] if answer and answer[-1] in eos else answer
            for answer in greedy_answers(model, *left_padded(rows, pad), max_new_tokens)]


def router_agreement(moe, tokenizer, texts: list[str], seq_len: int = 256) -> dict:
    """Per MoE layer, the router's top-k recall of the oracle's top-k (largest expert output
    norm) on the texts; and the mean over layers.
    """
    hits: dict[int, list[float]] = {}

    def hook(index):
        def grab(module, inputs, _out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            experts, k = module.experts, module.gate.top_k
            picked = F.linear(x, module.gate.weight).topk(k, -1).indices
            norms = []
            for e in range(experts.num_experts):
                gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                norms.append(F.linear(F.silu(gate) * up, experts.down_proj[e]).norm(dim=-1))
            oracle = torch.stack(norms, 1).topk(k, -1).indices
            hits.setdefault(index, []).append(
                float((picked[:, :, None] == oracle[:, None, :]).any(-1).float().mean()))
        return grab

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in
               enumerate(moe.model.layers) if hasattr(layer.mlp, "experts")]
    try:
        with torch.inference_mode():
            for text in texts:
                moe(tokenizer(text, return_tensors="pt").input_ids[:, :seq_len])
    finally:
        for handle in handles:
            handle.remove()
    by_layer = {str(i): round(sum(v) / len(v), 4) for i, v in sorted(hits.items())}
    return {"mean": round(sum(by_layer.values()) / len(by_layer), 4), "by_layer": by_layer}


def tuning_sets(n_texts: int, n_prompts: int) -> tuple[list[str], list[list[int]]]:
    """The tuning split: the distillation's dev lead sections and the templated prompts of the
    corpus's dev chat samples.
    """
    from m2r2core.runtime.model import DEFAULT_MODEL
    from m2r2core.train import corpus
    from m2r2core.train.common import work_dir
    from m2r2core.train.moe_distill import dev_texts

    samples = corpus.load(work_dir(DEFAULT_MODEL) / "corpus", "dev", with_text=False)
    rows = [s.ids[:s.answer_start] for s in samples if s.kind == "chat" and s.answer_start]
    if len(rows) < n_prompts:
        raise corpus.CorpusError(f"The corpus's dev split has {len(rows)} chat prompts; "
                                 f"--prompts asks for {n_prompts}.")
    return dev_texts(n_texts), rows[:n_prompts]


def measure(trained: Path, n_texts: int, n_prompts: int, max_new_tokens: int, threads: int,
            progress=print, split: str = "reported") -> dict:
    """Perplexity, answers and router agreement of the dense model and each MoE of `trained`
    (a MoEfication folder: the committed one, or another, such as a fit of another structure,
    which builds into its own cache folder). `split`: the reported sets, or the tuning ones
    (tuning_sets).
    """
    from analysis.exits import rouge_l
    from analysis.prompts import load_prompts
    from m2r2core.config import EngineConfig
    from m2r2core.moe import distilled, moefy
    from m2r2core.runtime.model import DEFAULT_MODEL, load
    from m2r2core.train.moe import heldout_texts, perplexity

    torch.set_num_threads(threads)
    if split == "tuning":
        texts, prompt_ids = tuning_sets(n_texts, n_prompts)
        prompts: list[str] | None = None
    else:
        texts, prompt_ids = heldout_texts(n_texts), None
        prompts = [p.text for p in load_prompts("mt-bench")[:n_prompts]]
    count = len(prompts if prompts is not None else prompt_ids)
    folders = {"moefied": moefy.build(trained, distilled=False)}
    if distilled.exists(trained):
        folders["distilled"] = moefy.build(trained)
    report: dict = {"trained": trained.name, "split": split, "ppl_texts": len(texts),
                    "prompts": count, "max_new_tokens": max_new_tokens, "models": {}}
    dense_answers = None
    for name, folder in [("dense", DEFAULT_MODEL), *folders.items()]:
        progress(f"measuring {name}")
        loaded = load(EngineConfig(model=str(folder), dtype="float32", threads=threads))
        model, tokenizer = loaded.model, loaded.tokenizer
        answers = (batched_answers(model, tokenizer, prompts, max_new_tokens)
                   if prompts is not None else
                   answers_to_ids(model, tokenizer, prompt_ids, max_new_tokens))
        reps = [repetition(a) for a in answers]
        row = {"ppl": round(perplexity(model, tokenizer, texts), 3),
               "repeated_4grams_mean": round(sum(reps) / len(reps), 4),
               "repeated_4grams_max": round(max(reps), 4),
               "answers_over_half_repeated": sum(r > 0.5 for r in reps)}
        if dense_answers is None:
            dense_answers = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        else:
            decoded = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            scores = [rouge_l(d, ref) for d, ref in zip(decoded, dense_answers)]
            row |= {"rouge_l_vs_dense": round(sum(scores) / len(scores), 4),
                    "router_agreement": router_agreement(model, tokenizer, texts),
                    "sample": {"prompt": (prompts[0] if prompts is not None
                                          else tokenizer.decode(prompt_ids[0]))[:200],
                               "dense": dense_answers[0], "moe": decoded[0]}}
        report["models"][name] = row
        del loaded, model
    dense_ppl = report["models"]["dense"]["ppl"]
    for row in report["models"].values():
        row["ppl_ratio"] = round(row["ppl"] / dense_ppl, 4)
    return report


def cmd_quality(args: argparse.Namespace) -> None:
    """Measure, print, write the report, and record the figures in the distilled card."""
    from m2r2core import artifacts
    from m2r2core.moe import distilled, moefy

    trained = Path(args.trained or moefy.TRAINED_DIR)
    report = measure(trained, args.texts, args.prompts, args.max_new_tokens, args.threads,
                     split=args.split)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n")
    if "distilled" in report["models"] and args.split == "reported":
        card = artifacts.read_card(trained, distilled.CARD, "distilled MoE",
                                   distilled.DISTILL)
        card["metrics"]["quality"] = {
            name: {k: v for k, v in row.items() if k != "sample"}
            for name, row in report["models"].items()} | {
            "ppl_texts": report["ppl_texts"], "prompts": report["prompts"],
            "max_new_tokens": report["max_new_tokens"]}
        artifacts.write_json(trained / distilled.CARD, card, indent=2)


def layer_sensitivity(moe, dense, measure: Callable[[object], float], max_dense: int,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Which MoE layers cost the most: the score (`measure`, e.g. perplexity) with each MoE
    layer alone given back its dense MLP, then with the worst layers made dense one by one (in
    the order of that single-layer score). `moe` is left as it was.
    """
    layers = [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "experts")]
    originals = {i: moe.model.layers[i].mlp for i in layers}
    total, done = len(layers) + min(max_dense, len(layers)), 0
    base = measure(moe)
    single: dict[int, float] = {}
    greedy = []
    try:
        for index in layers:
            moe.model.layers[index].mlp = dense.model.layers[index].mlp
            single[index] = measure(moe)
            moe.model.layers[index].mlp = originals[index]
            done += 1
            if progress:
                progress(done, total)
        order = sorted(layers, key=lambda i: single[i])
        for count, index in enumerate(order[:max_dense], start=1):
            moe.model.layers[index].mlp = dense.model.layers[index].mlp
            greedy.append({"dense_layers": sorted(order[:count]), "score": measure(moe)})
            done += 1
            if progress:
                progress(done, total)
    finally:
        for index, mlp in originals.items():
            moe.model.layers[index].mlp = mlp
    return {"moe": base, "one_layer_dense": {str(i): v for i, v in single.items()},
            "order": order, "greedy": greedy}


ROUTINGS = (
    {"select": "router", "k": None, "weights": "router"},
    {"select": "router", "k": None, "weights": "uniform"},
    {"select": "oracle", "k": None, "weights": "router"},
    {"select": "oracle", "k": None, "weights": "uniform"},
    {"select": "router", "k": 3, "weights": "uniform"},
    {"select": "router", "k": 4, "weights": "uniform"},
    {"select": "router", "k": 0, "weights": "uniform"},
)
"""The routings `routing_probe` compares by default. k None: the MoE's own top-k; k 0: every
expert. The first is the MoE as built (its score must equal the unpatched model's)."""


def expert_outputs(experts, x: torch.Tensor) -> torch.Tensor:
    """(E, T, H) every expert's output for every token (T, H), unweighted: the cost of a dense
    MLP, which a probe can afford.
    """
    gate, up = torch.einsum("th,eih->eti", x, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("eti,ehi->eth", experts.act_fn(gate) * up, experts.down_proj)


def routed_forward(block, select: str, k: int, weights: str, k_built: int) -> Callable:
    """A Qwen2-MoE sparse block's forward with another routing: the top-k experts by the
    router's probabilities ('router') or by the norm of their outputs ('oracle', what a perfect
    router of this MoE would pick), weighted as Qwen2-MoE weights them ('router': normalised
    top-k probabilities, rescaled so that the weights sum to k as the build's do for its own k)
    or each by one ('uniform': every chosen expert's neurons at their dense weight, as the
    MoEfication cut them). The build multiplies each expert's down projection by its own k, so
    the outputs here are divided by it first.
    """
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        shared = F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        outs = expert_outputs(block.experts, x) / k_built
        probs = F.softmax(F.linear(x, block.gate.weight).float(), dim=-1)
        rank = probs if select == "router" else outs.float().norm(dim=-1).T
        top = rank.topk(k, dim=-1).indices
        chosen = torch.zeros_like(probs).scatter(-1, top, 1.0)
        if weights == "router":
            picked = probs * chosen
            chosen = picked / picked.sum(-1, keepdim=True) * k
        return (shared + torch.einsum("te,eth->th", chosen.to(outs.dtype), outs)).reshape(shape)

    return forward


def routing_probe(moe, measure: Callable[[object], float], routings=ROUTINGS,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Where an MoE's loss comes from: the score (`measure`, e.g. perplexity) under other
    routings of the same experts (`routed_forward`): the router against the oracle's choice
    (what routing costs), router weights against each expert at weight one (what the
    weighting costs), and more experts per token (what the sparsity costs; every expert is
    the MoEfication's ceiling). `moe` is left as it was.
    """
    blocks = [layer.mlp for layer in moe.model.layers if hasattr(layer.mlp, "experts")]
    k_built, n_experts = blocks[0].gate.top_k, blocks[0].gate.num_experts
    rows = [{"routing": "unpatched", "score": measure(moe)}]
    try:
        for done, routing in enumerate(routings, start=1):
            k = {None: k_built, 0: n_experts}.get(routing["k"], routing["k"])
            for block in blocks:
                block.forward = routed_forward(block, routing["select"], k, routing["weights"],
                                               k_built)
            rows.append(routing | {"k": k, "score": measure(moe)})
            if progress:
                progress(done, len(routings))
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return {"k_built": k_built, "experts": n_experts, "rows": rows}


def _run_probe(args: argparse.Namespace, probe: Callable) -> None:
    """Load the distilled MoE (or, with --moefied, the plain MoEfication) and the dense model in
    fp32, run `probe(moe, dense, measure, progress)` with `measure` the perplexity on the
    distillation's dev texts (a tuning split: the reported set is not read), and print and write
    its report with the dense perplexity and the command line.
    """
    from m2r2core import artifacts
    from m2r2core.config import EngineConfig
    from m2r2core.moe import distilled, moefy
    from m2r2core.runtime.model import DEFAULT_MODEL, load
    from m2r2core.train.common import progress_bar
    from m2r2core.train.moe import perplexity
    from m2r2core.train.moe_distill import dev_texts

    use_distilled = not args.moefied and distilled.exists(moefy.TRAINED_DIR)
    folder = moefy.build(distilled=use_distilled)
    config = dict(dtype="float32", threads=args.threads)
    dense = load(EngineConfig(model=DEFAULT_MODEL, **config))
    moe = load(EngineConfig(model=str(folder), **config))
    texts = dev_texts(args.texts)
    report = probe(moe.model, dense.model,
                   lambda m: round(perplexity(m, moe.tokenizer, texts), 3),
                   progress_bar(args.cmd))
    report |= {"which": "distilled" if use_distilled else "moefied", "texts": len(texts),
               "dense": round(perplexity(dense.model, dense.tokenizer, texts), 3),
               "metric": "perplexity (dev texts)",
               "command": "python -m m2r2core.train.moe " + " ".join(sys.argv[1:])}
    print(json.dumps(report, indent=1))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(args.report, report)


def cmd_routing(args: argparse.Namespace) -> None:
    """Perplexity of the MoE under other routings of its experts (routing_probe)."""
    _run_probe(args, lambda moe, dense, measure, bar: routing_probe(moe, measure,
                                                                     progress=bar))


def cmd_sensitivity(args: argparse.Namespace) -> None:
    """Perplexity of the MoE with its costliest layers made dense (layer_sensitivity)."""
    _run_probe(args, lambda moe, dense, measure, bar: layer_sensitivity(
        moe, dense, measure, args.max_dense, bar))


def add_parser(sub) -> None:
    """`quality` on the MoE command line."""
    q = sub.add_parser("quality", help="perplexity, answers and routers of each MoE vs dense")
    q.add_argument("--texts", type=int, default=60)
    q.add_argument("--prompts", type=int, default=20)
    q.add_argument("--max-new-tokens", type=int, default=128)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--report", type=Path, default=None)
    q.add_argument("--trained", type=Path, default=None, help="the MoEfication folder to "
                   "measure (default: the committed one, artifacts/smollm2-135m-moe)")
    q.add_argument("--split", default="reported", choices=("reported", "tuning"),
                   help="reported: held-out leads and MT-Bench (written into the card); "
                        "tuning: the distillation's dev leads and the corpus's dev prompts, "
                        "to choose between MoEs (never written into the card)")
    q.set_defaults(func=cmd_quality)
    s = _probe_parser(sub, "sensitivity", cmd_sensitivity,
                      "perplexity with the costliest MoE layers made dense")
    s.add_argument("--max-dense", type=int, default=8, help="layers made dense, one by one")
    _probe_parser(sub, "routing", cmd_routing, "perplexity under other routings of the same "
                  "experts (oracle choice, uniform weights, more experts per token)")


def _probe_parser(sub, name: str, func: Callable, help_text: str):
    """A probe's command line: which MoE, how many dev texts, threads, where the report goes."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--texts", type=int, default=12, help="dev texts (the distillation's)")
    p.add_argument("--moefied", action="store_true", help="the plain MoEfication, not the "
                   "distilled MoE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", type=Path, default=None)
    p.set_defaults(func=func)
    return p
