"""One training run's folder: its checkpoint (resumable, written atomically), its per-step
metrics and held-out evaluations, and the thinned log committed beside the trained files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from m2r2core.artifacts import TRAINING_LOG, write_json

log = logging.getLogger("m2r2core.train")


class Run:
    """One adapter training run: its folder, checkpoint and metrics log."""

    def __init__(self, folder: Path) -> None:
        """Use (and create) the run folder."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = folder / "checkpoint.pt"
        self.metrics = folder / "metrics.jsonl"
        """One line per training step."""
        self.evals = folder / "eval.jsonl"
        """One line per held-out evaluation."""

    def resume(self, accel: torch.nn.Module, optim, restart: bool) -> tuple[int, float, int]:
        """Load the checkpoint if there is one; (step, best dev agreement so far, training
        tokens so far).
        """
        if restart or not self.checkpoint.is_file():
            return 0, -1.0, 0
        state = torch.load(self.checkpoint, weights_only=False, map_location="cpu")
        accel.load_state_dict(state["adapters"])
        optim.load_state_dict(state["optim"])
        log.info("resumed from %s at step %d", self.checkpoint, state["step"])
        return state["step"], state.get("best", -1.0), state.get("tokens", 0)

    def save(self, accel: torch.nn.Module, optim, step: int, best: float, tokens: int = 0
             ) -> None:
        """Write the checkpoint atomically."""
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save({"adapters": accel.state_dict(), "optim": optim.state_dict(), "step": step,
                    "best": best, "tokens": tokens}, tmp)
        tmp.replace(self.checkpoint)

    def log(self, row: dict, evaluation: bool = False) -> None:
        """Append one line to the metrics log (or the evaluation log)."""
        with (self.evals if evaluation else self.metrics).open("a") as handle:
            handle.write(json.dumps(row) + "\n")



def write_training_log(run: Run, out: Path, every: int = 5) -> None:
    """Write the run's held-out evaluations and every `every`-th step's metrics into
    out/TRAINING_LOG (atomic), so the committed adapters carry the curve that chose them.
    """
    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.is_file() else []

    every_step = rows(run.metrics)
    steps = [r for r in every_step if r.get("step", 0) % every == 0 or r is every_step[-1]]
    keep = ("step", "loss", "tokens", "elapsed_s", "tokens_per_s", "lr")
    log_rows = [{k: v for k, v in r.items() if k in keep or k.startswith(("kl@", "agree@"))}
                for r in steps]
    body = {"run": run.folder.name, "evaluations": rows(run.evals), "steps": log_rows}
    write_json(Path(out) / TRAINING_LOG, body, indent=None)
