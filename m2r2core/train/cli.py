"""The training CLI's arguments: what every command shares, then each command's own."""

from __future__ import annotations

import argparse
from pathlib import Path

from m2r2core.config import batched_dtype
from m2r2core.train.adapters import training_dtype

COMMANDS = ("corpus", "data", "adapters", "routers", "medusa", "lens", "speed", "agreement",
            "gap", "soup", "variants")


def parser(description: str) -> argparse.ArgumentParser:
    """The CLI's arguments (`description`: the package docstring)."""
    p = argparse.ArgumentParser(prog="python -m m2r2core.train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    own = {"corpus": [_corpus], "data": [_data], "routers": [_routers], "medusa": [_medusa],
           "lens": [_lens], "speed": [_report, _adapters], "agreement": [_report, _agreement],
           "gap": [_report, _gap], "soup": [_report, _soup],
           "adapters": [_adapters], "variants": [_report, _adapters, _variants]}
    for name in COMMANDS:
        s = sub.add_parser(name)
        _common(s, name)
        if name != "data":
            _inputs(s)
        for add in own.get(name, []):
            add(s)
    sub.choices["speed"].set_defaults(steps=6)
    return p


def _common(s: argparse.ArgumentParser, name: str) -> None:
    """Model, precision, threads, seed, output, sequence length, device."""
    s.add_argument("--model", default="smollm2-135m-instruct")
    trains = name in ("adapters", "agreement", "gap", "soup", "variants")
    s.add_argument("--dtype", default=training_dtype() if trains else batched_dtype(),
                   choices=["bfloat16", "float32"],
                   help="default: the faster one for this job on this machine")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None)
    s.add_argument("--seq-len", type=int, default=192)
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _inputs(s: argparse.ArgumentParser) -> None:
    """Where the training data and the adapters come from."""
    s.add_argument("--data", type=Path, default=None,
                   help="an old-style JSONL corpus (python -m m2r2core.train data)")
    s.add_argument("--corpus", type=Path, default=None,
                   help="a distillation corpus folder (default: the one `corpus` "
                        "builds, when it exists)")
    s.add_argument("--adapters", type=Path, default=None)


def _corpus(s: argparse.ArgumentParser) -> None:
    """The distillation corpus's sizes."""
    s.add_argument("--n-sharegpt", type=int, default=3000)
    s.add_argument("--n-wiki", type=int, default=2000)
    s.add_argument("--heldout", type=int, default=120,
                   help="instructions answered per held-out split (dev, test)")
    s.add_argument("--max-new-tokens", type=int, default=160)
    s.add_argument("--text-tokens", type=int, default=4_500_000)
    s.add_argument("--batch-size", type=int, default=96)
    s.add_argument("--shard-size", type=int, default=192)
    s.add_argument("--window", type=int, default=256,
                   help="tokens per teacher-forced text window")
    s.add_argument("--grow", type=int, default=0, metavar="N",
                   help="after the build, add N fresh train instructions (a growth round; "
                   "half ShareGPT, half Wikipedia, none planned before), answered the same way")
    s.add_argument("--grow-round", type=int, default=1, metavar="R",
                   help="which growth round --grow builds or resumes (default 1)")
    s.add_argument("--plan-only", action="store_true",
                   help="write the plans (and, with --grow, that round's) and answer nothing: a "
                   "later round's plan depends on every earlier one, so a lost cache rebuilds "
                   "them first")
    s.add_argument("--growth-only", action="store_true",
                   help="with --grow: answer the held-out splits and that growth round, not "
                   "the first build's train split (fresh data for a continuation)")


def _data(s: argparse.ArgumentParser) -> None:
    """The first, small self-distillation corpus."""
    s.add_argument("--n-chat", type=int, default=480)
    s.add_argument("--n-text", type=int, default=480)
    s.add_argument("--max-new-tokens", type=int, default=128)


def _routers(s: argparse.ArgumentParser) -> None:
    """Exit routers."""
    s.add_argument("--check-vocab", type=int, default=2048,
                   help="sub-vocabulary of the exit-check head (0: full head)")
    s.add_argument("--per-sample", type=int, default=48)
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--limit", type=int, default=0,
                   help="use only this many router samples (0: all)")


def _medusa(s: argparse.ArgumentParser) -> None:
    """Medusa heads."""
    s.add_argument("--heads", type=int, default=4, help="K, drafts per verification")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--batch-size", type=int, default=512, help="positions per step")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--limit", type=int, default=0,
                   help="use this many training samples, drawn at random (0: all)")
    s.add_argument("--text-share", type=float, default=0.3,
                   help="teacher-forced text windows as this share of the training rows, as "
                        "for the adapters (the rest: the model's own answers; 1: all text)")


def _lens(s: argparse.ArgumentParser) -> None:
    """The tuned lens."""
    s.add_argument("--rank", type=int, default=64, help="rank of each translator's delta")
    s.add_argument("--ridge", type=float, default=1e-3)
    s.add_argument("--fit-samples", type=int, default=3000)
    s.add_argument("--steps", type=int, default=200, help="KL refinement steps")
    s.add_argument("--positions", type=int, default=64, help="positions per step")
    s.add_argument("--lr", type=float, default=1e-3)


def _report(s: argparse.ArgumentParser) -> None:
    """A JSON report file."""
    s.add_argument("--report", type=Path, default=None, help="write the JSON here")


def _soup(s: argparse.ArgumentParser) -> None:
    """The greedy soup's ingredients and dev measurement."""
    s.add_argument("--ingredients", type=Path, nargs="+", required=True,
                   help="adapter folders of one shape and model (e.g. continuations from the "
                        "committed adapters), or training runs' checkpoints (a run folder or "
                        "its checkpoint.pt: where the run stopped); at least one saved folder")
    s.add_argument("--eval-samples", type=int, default=48,
                   help="dev samples the greedy choice is made on")


def _gap(s: argparse.ArgumentParser) -> None:
    """The generalisation gap: agreement on trained and held-out answers, by source."""
    s.add_argument("--limit", type=int, default=60,
                   help="samples per slice: the first N of each split's answers from each source "
                        "(the train split lists the first build's answers first)")


def _agreement(s: argparse.ArgumentParser) -> None:
    """The held-out agreement measurement."""
    s.add_argument("--split", default="test", choices=["dev", "test", "train"],
                   help="test (held out; the figure that counts), dev (the tuning split) or "
                        "train (the first build's answers first, then the growth rounds' and "
                        "the text windows): train against dev is the generalisation gap")
    s.add_argument("--source", default="",
                   choices=["", "sharegpt", "sharegpt-followup", "sharegpt-turn", "wiki",
                            "text"],
                   help="only the samples from this source (ShareGPT first turns, their later "
                        "turns after the conversation or asked alone, instructions written "
                        "from Wikipedia, or the teacher-forced text windows), before --skip "
                        "and --limit (default: all)")
    s.add_argument("--limit", type=int, default=0, help="first N samples (0: all)")
    s.add_argument("--skip", type=int, default=0,
                   help="start after this many samples (with --split train: 864 skips the first "
                        "build's answers, to measure on a growth round's)")
    s.add_argument("--record-tokens", type=int, default=0,
                   help="append these adapters to the committed adapters' history as the state "
                        "reached after this many training tokens (cumulative over every run "
                        "that led to it); the Training page fits its scaling curve to it")
    s.add_argument("--run-label", default="", help="the state's name in that history")


def _adapters(s: argparse.ArgumentParser) -> None:
    """The adapters' shape, objective, schedule and run control (also `speed`'s, which
    overrides --steps).
    """
    s.add_argument("--rate", type=float, default=2.0)
    s.add_argument("--rank", type=int, default=64,
                   help="adapter rank (64 won the equal-budget variant comparison; 16 is the "
                        "committed adapters' rank)")
    s.add_argument("--margin", type=int, default=2)
    s.add_argument("--branch-layer", type=int, default=0)
    s.add_argument("--target", default="rate", choices=["rate", "final"])
    s.add_argument("--steps", type=int, default=240)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--kl-weight", type=float, default=0.5)
    s.add_argument("--kl-positions", type=int, default=128)
    s.add_argument("--kl-every", type=int, default=3)
    s.add_argument("--kl-depths", type=int, nargs="*", default=[],
                   help="the fast depths with the KL term (default: every --kl-every)")
    s.add_argument("--kl-depth-weights", type=float, nargs="+", default=None,
                   help="one weight per --kl-depths entry, multiplying that depth's KL "
                        "(default: 1 each)")
    s.add_argument("--select-depths", type=int, nargs="+", default=None,
                   help="the best adapters are those with the highest mean dev agreement "
                        "at these fast depths (default: depth N/r alone)")
    s.add_argument("--bias", action="store_true",
                   help="also learn a bias on each adapted block's MLP output")
    s.add_argument("--bias-lr-mult", type=float, default=50.0,
                   help="learning-rate multiplier of those biases")
    s.add_argument("--adapter-dropout", type=float, default=0.0,
                   help="dropout on each adapter's input while training (a regulariser "
                        "against fitting the training content; 0: none)")
    s.add_argument("--blocks", default="same", choices=["same", "rate"],
                   help="the base block fast depth d runs: d, or tau(d)")
    s.add_argument("--kv", default="shared", choices=["shared", "own"],
                   help="fast queries read the slow cache, or the fast stream's own")
    s.add_argument("--batching", default="bucketed", choices=["bucketed", "padded"],
                   help="rows of similar length padded to their longest (default), or "
                        "--batch-size rows padded to --seq-len")
    s.add_argument("--batch-tokens", type=int, default=0,
                   help="tokens per bucketed batch (default batch-size x seq-len)")
    s.add_argument("--warm-start", type=int, default=0,
                   help="first steps block by block (each fast block from its input "
                        "depth's slow target)")
    s.add_argument("--eval-every", type=int, default=0,
                   help="held-out agreement every this many steps; the best adapters "
                        "so far are written to --out (0: at the end only)")
    s.add_argument("--eval-samples", type=int, default=48)
    s.add_argument("--text-share", type=float, default=None,
                   help="teacher-forced text windows as this share of the training "
                        "rows (the rest: the model's own answers; default: all text)")
    s.add_argument("--fresh-share", type=float, default=None,
                   help="the corpus growth rounds' answers as this share of the train "
                        "answers (every one of them, plus a seeded sample of the first "
                        "build's); default: every train answer alike")
    s.add_argument("--fresh-rounds", type=int, nargs="+", default=None,
                   help="with --fresh-share: only these growth rounds count as fresh (the "
                        "others join the first build's, sampled); default: every round")
    s.add_argument("--max-minutes", type=float, default=0,
                   help="stop after this wall-clock budget (0: none)")
    s.add_argument("--save-every", type=int, default=10)
    s.add_argument("--restart", action="store_true", help="ignore a checkpoint")
    s.add_argument("--init", type=Path, default=None,
                   help="start from another run's adapters (checkpoint .pt, or an "
                        "adapter folder or .safetensors file)")
    s.add_argument("--run-name", default=None,
                   help="checkpoint folder name (default adapters-r<rate>)")


def _variants(s: argparse.ArgumentParser) -> None:
    """The equal-budget comparison of the adapters' design variants."""
    from m2r2core.train.variants import VARIANTS

    s.add_argument("--minutes", type=float, default=30.0,
                   help="wall-clock cap of one variant's steps (loading and evaluation not "
                        "counted); the budget is --steps")
    s.add_argument("--only", nargs="*", choices=list(VARIANTS), default=None,
                   help="these variants only (default: every one not yet in the report)")
