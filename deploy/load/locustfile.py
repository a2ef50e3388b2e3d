"""Load profile of `hndsr serve` for locust: a realistic mix of image sizes, scales and DDIM steps.

    locust -f deploy/load/locustfile.py --host http://127.0.0.1:8000                       # web UI on :8089
    locust -f deploy/load/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 5m --csv load

The mix (weights): small tiles, 128 px at x4 with the model's default steps (12); mid-size crops, 256 px at x2.5
(6); large crops, 512 px at x3 with 2 steps (2); the model card, GET /v1/model (1). Each simulated client waits
0.5 to 2 s between requests. Images are crops of real satellite imagery: the PNGs of HNDSR_LOAD_IMAGES (a folder;
default imagery/realsat when present) or the repository's reference tile, tiled. With an API key, set
HNDSR_API_KEY. A 503 (busy) or 429 (quota) counts as a failure, named by its code, so the report shows when the
server turned work away.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
from locust import HttpUser, between, task
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SIZES = (128, 256, 512)


def _sources() -> list[np.ndarray]:
    folder = Path(os.environ.get("HNDSR_LOAD_IMAGES", REPO / "imagery" / "realsat"))
    images = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))] \
        if folder.is_dir() else []
    if not images:
        tile = np.asarray(Image.open(REPO / "hndsr" / "reference_lr.png").convert("RGB"))
        images = [np.tile(tile, (9, 9, 1))]
    return images


def _crops(seed: int = 0) -> dict[int, list[bytes]]:
    """A few PNG crops per size, from every source image big enough (tiled up when none is)."""
    rng = random.Random(seed)
    crops: dict[int, list[bytes]] = {}
    for size in SIZES:
        for image in _sources():
            if min(image.shape[:2]) < size:
                reps = -(-size // min(image.shape[:2]))
                image = np.tile(image, (reps, reps, 1))
            y, x = rng.randrange(image.shape[0] - size + 1), rng.randrange(image.shape[1] - size + 1)
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[y:y + size, x:x + size])).save(buffer, format="PNG")
            crops.setdefault(size, []).append(buffer.getvalue())
    return crops


CROPS = _crops()


class SuperResolveUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        key = os.environ.get("HNDSR_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def _super_resolve(self, size: int, scale: float, steps: int | None, name: str) -> None:
        data = {"scale": f"{scale:g}", "seed": str(random.randrange(1000))}
        if steps is not None:
            data["steps"] = str(steps)
        files = {"file": ("crop.png", random.choice(CROPS[size]), "image/png")}
        expected = f"{int(size * scale + 0.5)}x{int(size * scale + 0.5)}"
        with self.client.post("/v1/super-resolve", files=files, data=data, name=name, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code} {answer.text[:200]}")
            elif answer.headers.get("X-Output-Size") != expected:
                answer.failure(f"output {answer.headers.get('X-Output-Size')}, expected {expected}")

    @task(12)
    def small_tile(self) -> None:
        self._super_resolve(128, 4.0, None, "128 px x4 default steps")

    @task(6)
    def mid_crop(self) -> None:
        self._super_resolve(256, 2.5, None, "256 px x2.5 default steps")

    @task(2)
    def large_crop(self) -> None:
        self._super_resolve(512, 3.0, 2, "512 px x3 2 steps")

    @task(1)
    def model_card(self) -> None:
        self.client.get("/v1/model", name="GET /v1/model")
