"""What a plain decoding step records of M2R2 beside the slow stream: the accelerated stream of
the position just decoded (read over the slow cache, never writing it), the slow stream read
through the tuned lens, and every exit rule's scores along each of them. The plain loop
(runtime/decode.py) knows nothing of this; the engine hands it a tracer.
"""

from __future__ import annotations

import numpy as np
import torch

from m2r2core.exits.routers import RouterBundle, scores_offline
from m2r2core.runtime.decode import ForwardOutput, StepTracer
from m2r2core.runtime.hf_compat import DecoderParts
from m2r2core.runtime.lens import fast_stats
from m2r2core.stream.accel import Accelerator, fast_trajectory
from m2r2core.stream.tuned_lens import TunedLens
from m2r2core.trace import RuleScores


class FastStreamTracer(StepTracer):
    """Traces the fast stream of every decoded position (with adapters), the tuned-lens reading
    of the slow stream (with a tuned lens), and the routers' scores along each stream.
    """

    def __init__(self, parts: DecoderParts, accel: Accelerator | None,
                 routers: RouterBundle | None, capture: bool, tuned: TunedLens | None = None
                 ) -> None:
        """Trace with these adapters, routers and tuned lens (any may be None); keep each fast
        trajectory with capture.
        """
        self.parts, self.accel, self.routers, self.capture = parts, accel, routers, capture
        self.tuned = tuned
        self.rows: list[np.ndarray] = []
        """Each traced position's (D+1, H) fast trajectory, with capture."""

    @torch.inference_mode()
    def after_forward(self, out: ForwardOutput, cache, position: int) -> torch.Tensor | None:
        """(D+1, H): h^f_0 (the branch state) .. h^f_D of the position just fed (None without
        adapters).
        """
        if self.accel is None:
            return None
        start = out.states[self.accel.first][None, None]
        fast = fast_trajectory(self.parts, self.accel, start, cache, position)
        return torch.cat([start[0]] + [f[0] for f in fast])

    @torch.inference_mode()
    def fields(self, out: ForwardOutput, fast: torch.Tensor | None) -> dict:
        """The fast and tuned streams' TokenStep fields and every rule's scores along each."""
        top1 = int(out.logits.argmax())
        streams, fields = {"slow": out.states}, {}
        if fast is not None:
            fields["fast"] = fast_stats(self.parts, fast, out.states[-1], top1)
            streams["fast"] = fast
        if self.tuned is not None:  # layer 0 (embedding) and N are read as the logit lens does
            inner = self.tuned.translate_stack(out.states[1:])
            tuned = torch.cat([out.states[:1], inner])
            fields["tuned"] = fast_stats(self.parts, tuned, out.states[-1], top1)
            streams["tuned"] = tuned
        scores = {}
        if self.routers is not None:
            for stream, states in streams.items():
                got = scores_offline(self.routers, self.parts, stream, states[None, 1:],
                                     states[None, 0])
                scores |= {f"{stream}/{k}": tuple(round(x, 5) for x in v[0].tolist())
                           for k, v in got.items()}
        if self.capture and fast is not None:
            self.rows.append(fast.float().cpu().numpy())
        return fields | {"rule_scores": RuleScores(scores)}
