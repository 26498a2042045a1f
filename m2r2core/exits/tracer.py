"""What a plain decoding step records of M2R2 beside the slow stream: the accelerated stream of
the position just decoded (read over the slow cache, never writing it) and every exit rule's
scores along both streams. The plain loop (runtime/decode.py) knows nothing of this; the engine
hands it a tracer.
"""

from __future__ import annotations

import numpy as np
import torch

from m2r2core.exits.routers import RouterBundle, scores_offline
from m2r2core.runtime.decode import ForwardOutput, StepTracer
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.lens import fast_stats
from m2r2core.stream.accel import Accelerator, fast_trajectory


class FastStreamTracer(StepTracer):
    """Traces the fast stream of every decoded position, and the routers' scores."""

    def __init__(self, parts: DecoderParts, accel: Accelerator,
                 routers: RouterBundle | None, capture: bool) -> None:
        """Trace with these adapters (and routers); keep each fast trajectory with capture."""
        self.parts, self.accel, self.routers, self.capture = parts, accel, routers, capture
        self.rows: list[np.ndarray] = []
        """Each traced position's (D+1, H) fast trajectory, with capture."""

    @torch.inference_mode()
    def after_forward(self, out: ForwardOutput, cache, position: int) -> torch.Tensor:
        """(D+1, H): h^f_0 (the branch state) .. h^f_D of the position just fed."""
        start = out.states[self.accel.first][None, None]
        fast = fast_trajectory(self.parts, self.accel, start, cache, position)
        return torch.cat([start[0]] + [f[0] for f in fast])

    @torch.inference_mode()
    def fields(self, out: ForwardOutput, fast: torch.Tensor) -> dict:
        """The fast stream's TokenStep fields and every rule's scores along both streams."""
        stats = fast_stats(self.parts, fast, out.states[-1], int(out.logits.argmax()))
        scores = {}
        if self.routers is not None:
            for stream, states in (("fast", fast), ("slow", out.states)):
                got = scores_offline(self.routers, self.parts, stream, states[None, 1:],
                                     states[None, 0])
                scores |= {f"{stream}/{k}": tuple(round(x, 5) for x in v[0].tolist())
                           for k, v in got.items()}
        if self.capture:
            self.rows.append(fast.float().cpu().numpy())
        return {"fast": stats, "rule_scores": scores}
