"""Gradual roll-outs in the server: which version a request goes to, and when a candidate is backed out.

Routing: a client (its named key, else its API key, else its address) hashes to a fixed point in [0, 1); it
goes to the candidate when that point is below HNDSR_CANARY_WEIGHT. So a client always lands on the same version
for a given weight, and raising the weight only adds clients to the candidate.

Judging: every super-resolve outcome of either version goes into a sliding window (HNDSR_CANARY_WINDOW_S); a
server error is an inference failure or a passed deadline (504). Once the candidate has HNDSR_CANARY_MIN_REQUESTS
in it, it is backed out when its server-error ratio exceeds production's by more than
HNDSR_CANARY_MAX_ERROR_RATIO, or when, in a size band where both versions have HNDSR_CANARY_MIN_REQUESTS answers,
its p95 seconds per output megapixel exceed production's times HNDSR_CANARY_MAX_LATENCY_RATIO. Latency is only
compared like with like: a size band is a factor of 4 in output pixels (`size_band`), because the seconds per
megapixel of a small image are mostly the fixed cost of a pass (22.0 s for 16 px inputs against 3.5 s for
128 px ones, on two versions 0.1 % apart). Versions whose clients send sizes in different bands are not compared
on latency.
It is also backed out when, with HNDSR_CANARY_MIN_REQUESTS answers of each version carrying a consistency figure in
the window, its median consistency (dB: its answers shrunk back against their inputs, hndsr.monitoring) lies more
than HNDSR_CANARY_MAX_CONSISTENCY_DROP_DB below production's: a model that invents or loses structure, which
neither errors nor latency show. Each version answers its own clients' images, so the margin is wide (3 dB by
default: two versions of one recipe differ by a few tenths; a broken one by far more).
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass


def bucket(identity: str) -> float:
    """The client's fixed point in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"hndsr-canary:{identity}".encode()).digest()[:8], "big") / 2.0**64


BAND_FACTOR = 4  # a size band spans this factor in output pixels (2x in each side)


def size_band(pixels: int) -> tuple[int, int]:
    """The band of output pixel counts `pixels` falls in: [4^k, 4^(k+1)) as (low, high)."""
    k = int(math.floor(math.log(max(pixels, 1), BAND_FACTOR) + 1e-9))
    return BAND_FACTOR**k, BAND_FACTOR ** (k + 1)


def _band_name(band: tuple[int, int]) -> str:
    """A band by the square outputs it spans, e.g. "64x64-128x128 px" (4,096 to 16,383 output pixels)."""
    low, high = (math.isqrt(edge) for edge in band)
    return f"{low}x{low}-{high}x{high} px"


@dataclass(frozen=True)
class Outcome:
    at: float
    ok: bool  # False: a server error of this version (its inference failed or passed the deadline)
    s_per_megapixel: float | None  # queue + inference seconds per output megapixel, for answers
    band: tuple[int, int] | None = None  # the size band of the answer's output (size_band)
    consistency_db: float | None = None  # the answer's consistency (hndsr.monitoring), when computed


class Monitor:
    def __init__(self, window_s: float, min_requests: int, max_error_ratio: float, max_latency_ratio: float,
                 max_consistency_drop_db: float = 3.0) -> None:
        self.window_s, self.min_requests = window_s, min_requests
        self.max_error_ratio, self.max_latency_ratio = max_error_ratio, max_latency_ratio
        self.max_consistency_drop_db = max_consistency_drop_db
        self._outcomes: dict[str, deque[Outcome]] = {}

    def record(self, version: str, ok: bool, seconds: float | None = None, pixels: int | None = None,
               consistency_db: float | None = None) -> None:
        per_mp = seconds / (pixels / 1e6) if ok and seconds is not None and pixels else None
        outcomes = self._outcomes.setdefault(version, deque())
        outcomes.append(Outcome(time.monotonic(), ok, per_mp, size_band(pixels) if per_mp is not None else None,
                                consistency_db if ok else None))
        self._trim(outcomes)

    def _trim(self, outcomes: deque[Outcome]) -> None:
        horizon = time.monotonic() - self.window_s
        while outcomes and outcomes[0].at < horizon:
            outcomes.popleft()

    def numbers(self, version: str) -> dict:
        """The version's requests, server errors, error ratio and p95 seconds per output megapixel in the window,
        overall and per size band (`bands`: answers and p95 per band, smallest first)."""
        outcomes = self._outcomes.get(version, deque())
        self._trim(outcomes)
        requests = len(outcomes)
        errors = sum(not o.ok for o in outcomes)
        by_band: dict[tuple[int, int], list[float]] = {}
        for o in outcomes:
            if o.s_per_megapixel is not None:
                by_band.setdefault(o.band, []).append(o.s_per_megapixel)
        consistency = sorted(o.consistency_db for o in outcomes if o.consistency_db is not None)
        return {"requests": requests, "server_errors": errors, "error_ratio": errors / requests if requests else 0.0,
                "consistency_answers": len(consistency),
                "median_consistency_db": round(statistics.median(consistency), 3) if consistency else None,
                "p95_s_per_megapixel": _p95([v for values in by_band.values() for v in values]),
                "bands": {_band_name(band): {"answers": len(values), "p95_s_per_megapixel": _p95(values)}
                          for band, values in sorted(by_band.items())}}

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
        for band, theirs in cand["bands"].items():  # like with like: the same size band only
            ours = prod["bands"].get(band)
            if ours is None or min(theirs["answers"], ours["answers"]) < self.min_requests:
                continue
            if theirs["p95_s_per_megapixel"] > self.max_latency_ratio * ours["p95_s_per_megapixel"]:
                return (f"p95 {theirs['p95_s_per_megapixel']:.3f} s per output megapixel against production "
                        f"v{production}'s {ours['p95_s_per_megapixel']:.3f} s for outputs of {band} "
                        f"({theirs['answers']} and {ours['answers']} answers over {self.window_s:g} s; allowed: "
                        f"x{self.max_latency_ratio:g})"), numbers
        if min(cand["consistency_answers"], prod["consistency_answers"]) >= self.min_requests \
                and cand["median_consistency_db"] < prod["median_consistency_db"] - self.max_consistency_drop_db:
            return (f"median consistency {cand['median_consistency_db']:.2f} dB against production v{production}'s "
                    f"{prod['median_consistency_db']:.2f} dB ({cand['consistency_answers']} and "
                    f"{prod['consistency_answers']} answers over {self.window_s:g} s; allowed: "
                    f"{self.max_consistency_drop_db:g} dB less): its answers agree less with their own inputs"), numbers
        return None

    def forget(self, version: str) -> None:
        self._outcomes.pop(version, None)


def _p95(values: list[float]) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)] if values else None
