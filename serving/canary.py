"""Gradual roll-outs in the server: which version a request goes to, and when a candidate is backed out.

Routing: a client (its named key, else its API key, else its address) hashes to a fixed point in [0, 1); it
goes to the candidate when that point is below HNDSR_CANARY_WEIGHT. So a client always lands on the same version
for a given weight, and raising the weight only adds clients to the candidate.

Judging: every super-resolve outcome of either version goes into a sliding window (HNDSR_CANARY_WINDOW_S). Once
the candidate has HNDSR_CANARY_MIN_REQUESTS in it, it is backed out when its server-error ratio exceeds
production's by more than HNDSR_CANARY_MAX_ERROR_RATIO, or (with as many production requests too) when its p95
seconds per output megapixel exceed production's times HNDSR_CANARY_MAX_LATENCY_RATIO.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass


def bucket(identity: str) -> float:
    """The client's fixed point in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"hndsr-canary:{identity}".encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Outcome:
    at: float
    ok: bool  # False: a server error of this version (its inference failed or passed the deadline)
    s_per_megapixel: float | None  # queue + inference seconds per output megapixel, for answers


class Monitor:
    def __init__(self, window_s: float, min_requests: int, max_error_ratio: float, max_latency_ratio: float) -> None:
        self.window_s, self.min_requests = window_s, min_requests
        self.max_error_ratio, self.max_latency_ratio = max_error_ratio, max_latency_ratio
        self._outcomes: dict[str, deque[Outcome]] = {}

    def record(self, version: str, ok: bool, seconds: float | None = None, pixels: int | None = None) -> None:
        per_mp = seconds / (pixels / 1e6) if ok and seconds is not None and pixels else None
        outcomes = self._outcomes.setdefault(version, deque())
        outcomes.append(Outcome(time.monotonic(), ok, per_mp))
        self._trim(outcomes)

    def _trim(self, outcomes: deque[Outcome]) -> None:
        horizon = time.monotonic() - self.window_s
        while outcomes and outcomes[0].at < horizon:
            outcomes.popleft()

    def numbers(self, version: str) -> dict:
        """The version's requests, server errors, error ratio and p95 seconds per output megapixel in the window."""
        outcomes = self._outcomes.get(version, deque())
        self._trim(outcomes)
        requests = len(outcomes)
        errors = sum(not o.ok for o in outcomes)
        latencies = sorted(o.s_per_megapixel for o in outcomes if o.s_per_megapixel is not None)
        p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else None
        return {"requests": requests, "server_errors": errors, "error_ratio": errors / requests if requests else 0.0,
                "p95_s_per_megapixel": p95}

    def verdict(self, candidate: str, production: str) -> tuple[str, dict] | None:
        """(why, numbers) when the candidate should be backed out, else None."""
        cand, prod = self.numbers(candidate), self.numbers(production)
        numbers = {"candidate": candidate, "production": production, "window_s": self.window_s,
                   "candidate_numbers": cand, "production_numbers": prod}
        if cand["requests"] < self.min_requests:
            return None
        if cand["error_ratio"] - prod["error_ratio"] > self.max_error_ratio:
            return (f"server errors in {cand['error_ratio']:.1%} of {cand['requests']} requests against production "
                    f"v{production}'s {prod['error_ratio']:.1%} of {prod['requests']} over {self.window_s:g} s "
                    f"(allowed: {self.max_error_ratio:.1%} more)"), numbers
        if prod["requests"] >= self.min_requests and cand["p95_s_per_megapixel"] and prod["p95_s_per_megapixel"] \
                and cand["p95_s_per_megapixel"] > self.max_latency_ratio * prod["p95_s_per_megapixel"]:
            return (f"p95 {cand['p95_s_per_megapixel']:.3f} s per output megapixel against production "
                    f"v{production}'s {prod['p95_s_per_megapixel']:.3f} s over {self.window_s:g} s "
                    f"(allowed: x{self.max_latency_ratio:g})"), numbers
        return None

    def forget(self, version: str) -> None:
        self._outcomes.pop(version, None)
