"""How far a folder of images lies from a model's training data, in the figures the server reports
(hndsr/monitoring.py): PSI per band and the share of pixels in the training range, for the images as they are,
darkened by half and contrast-stretched (2-98 %).

    python benchmarks/input_drift.py [--reference models/reference.json] [--images imagery/realsat] [--crops 30]

Each case pools `--crops` crops of 64 px drawn from the images in proportion to their area (seed 0), as the
server's drift window pools requests. PNG/JPEG images, 8-bit RGB: the model's bands must be red, green, blue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hndsr import monitoring  # noqa: E402
from hndsr.images import decode_rgb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=REPO / "models" / monitoring.REFERENCE_FILE)
    parser.add_argument("--images", type=Path, default=REPO / "imagery" / "realsat")
    parser.add_argument("--crops", type=int, default=30)
    args = parser.parse_args()
    reference = monitoring.Reference.from_record(json.loads(args.reference.read_text()))
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [decode_rgb(p.read_bytes(), max_pixels=10**9) for p in files]
    rng = np.random.default_rng(0)
    area = np.array([i.shape[0] * i.shape[1] for i in images], dtype=np.float64)
    crops = []
    for k in rng.choice(len(images), args.crops, p=area / area.sum()):
        image = images[k]
        y, x = rng.integers(0, image.shape[0] - 63), rng.integers(0, image.shape[1] - 63)
        crops.append(image[y : y + 64, x : x + 64])

    def stretched(image: np.ndarray) -> np.ndarray:
        low, high = np.percentile(image, [2, 98], axis=(0, 1))
        return np.clip((image - low) / np.maximum(high - low, 1) * 255, 0, 255).round().astype(np.uint8)

    print(f"{len(files)} images of {args.images}, {args.crops} crops of 64 px; reference {args.reference} "
          f"({reference.record['input'].get('computed_on')})")
    print("| case | PSI " + " | ".join(b.name for b in reference.bands) + " | in training range |")
    print("|---|" + "---|" * len(reference.bands) + "---|")
    for name, change in (("as they are", lambda i: i), ("darkened by half", lambda i: i // 2),
                         ("stretched 2-98 %", stretched)):
        values = [change(c).astype(np.float32) / 255 for c in crops]
        counts = sum(monitoring.band_counts(v) for v in values)
        inside = np.mean([reference.in_range(v, None) for v in values])
        print(f"| {name} | " + " | ".join(f"{p:.3f}" for p in reference.psi(counts)) + f" | {inside:.1%} |")


if __name__ == "__main__":
    main()
