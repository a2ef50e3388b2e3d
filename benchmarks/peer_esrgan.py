"""HNDSR against a pretrained ESRGAN, side by side, on the LR tiles `hndsr evaluate` scores.

    python benchmarks/peer_esrgan.py [--data data/processed] [--models models] [--split test] [--limit N]
    python benchmarks/peer_esrgan.py --images imagery/realsat [--crop 240]

The peer is `@upscalerjs/esrgan-thick` 1.0.0 from npm (RRDN, trained on DIV2K photos; its weights ship in the
package) on TF.js 4.11 with the WebAssembly backend, one thread (`benchmarks/peer_esrgan/run.js`; `npm ci` in
that folder installs it from its lock file, and this script runs it when node_modules is missing). It has models
for x2, x3 and x4, so the table covers the split's scales among those. Both methods get the same stored LR tiles
(RGB; the peer takes 8 bits, so tiles of 16-bit or float data reach it rounded to 256 levels) and are scored like `hndsr evaluate`: PSNR on RGB in [0, 1] over the whole tile, mean over tiles,
against the stored HR, with bicubic (the same `bicubic_upsample` evaluate uses) as the baseline. HNDSR runs with
its validated default steps and evaluate's seed, in batches, on this machine's torch threads; the peer one tile
at a time. Prints a table and writes `reports/peer_esrgan.json`; on the test split it also adds ESRGAN's figures
(`esrgan_psnr_x<s>`, `esrgan_gain_x<s>`) to the MLflow run of `hndsr evaluate` for the same dataset and weights,
so the evaluation report shows the peer's column. `--self-ensemble` adds a row for HNDSR's geometric
self-ensemble (8 flips/turns averaged) with its time.

With `--images FOLDER` it measures instead as the issue that asked for this comparison did, on whole images the
model may never have seen (imagery/realsat is unseen by the default Blue Marble model, but training and test data
of the aerial profile's: score that model on its test split instead): centre crops of `--crop` px, LR made by
Pillow's bicubic, bicubic baseline by Pillow, PSNR on RGB 8-bit with a 4 px border shaved, mean over images.
Nothing here is a test: it only measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hndsr.checkpoint import STAGES, load_model, weights_hash
from hndsr.metrics import psnr
from hndsr.model import DIHEDRAL, bicubic_upsample
from hndsr.splits import dataset_hash, load_pairs

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "benchmarks" / "peer_esrgan"
PEER_SCALES = (2, 3, 4)


def _peer(scale: int, lr_uint8: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(N, h, w, 3) uint8 -> (N, h*scale, w*scale, 3) uint8 through node, and the seconds per tile."""
    with tempfile.TemporaryDirectory(prefix="hndsr-peer-") as tmp:
        source, target = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        header = {"shapes": [list(tile.shape[:2]) for tile in lr_uint8]}
        source.write_bytes(json.dumps(header).encode() + b"\n" + np.ascontiguousarray(lr_uint8).tobytes())
        subprocess.run(["node", str(PEER / "run.js"), str(scale), str(source), str(target)], check=True)
        data = target.read_bytes()
        newline = data.index(b"\n")
        result = json.loads(data[:newline])
        out = np.frombuffer(data[newline + 1:], dtype=np.uint8)
        shape = result["shapes"][0]
        return out.reshape(len(lr_uint8), shape[0], shape[1], 3), result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/processed", help="the ETL's output (default: %(default)s)")
    parser.add_argument("--models", default="models", help="HNDSR checkpoints (default: %(default)s)")
    parser.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="tiles per scale, evenly spaced (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="HNDSR's sampling seed, as evaluate's (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="HNDSR's batch (default: %(default)s)")
    parser.add_argument("--out", default="reports/peer_esrgan.json", help="where the figures go (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="a folder of PNG/JPEG images to measure on instead (see above)")
    parser.add_argument("--crop", type=int, default=240, help="with --images: centre crop size (default: %(default)s)")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="also score HNDSR's geometric self-ensemble (8 flips/turns averaged; 8x its time)")
    parser.add_argument("--experiment", default="hndsr", help="MLflow experiment of the evaluate run that gains "
                        "the ESRGAN figures (train.experiment; default: %(default)s)")
    args = parser.parse_args()
    if not (PEER / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEER, check=True)
    model = load_model(args.models).eval()
    if args.images:
        _on_images(model, args)
        return
    steps = model.defaults.steps
    pairs_by_scale = load_pairs(args.data, args.split, limit=args.limit)
    rows = {}
    print(f"{args.split} split of {args.data} (dataset {dataset_hash(args.data)[:12]}); HNDSR {steps} steps on "
          f"{torch.get_num_threads()} torch threads, batches of {args.batch_size}; ESRGAN (esrgan-thick, TF.js wasm) "
          "on one thread, one tile at a time")
    print("| scale | tiles | bicubic PSNR | HNDSR gain | ESRGAN gain | HNDSR s/tile | ESRGAN s/tile |")
    print("|---|---|---|---|---|---|---|")
    for scale, pairs in pairs_by_scale.items():
        if scale not in PEER_SCALES or pairs.lr.shape[1] != 3:
            continue
        hr = pairs.hr
        size = hr.shape[-2:]
        started = time.perf_counter()
        with torch.no_grad():
            ours = torch.cat([model.super_resolve(pairs.lr[i:i + args.batch_size], scale, steps=steps,
                                                  seed=args.seed + i, size=size).float()
                              for i in range(0, len(hr), args.batch_size)])
        ours_seconds = (time.perf_counter() - started) / len(hr)
        ensemble = None
        if args.self_ensemble:
            started = time.perf_counter()
            with torch.no_grad():
                ensemble = torch.cat([model.super_resolve(pairs.lr[i:i + args.batch_size], scale, steps=steps,
                                                          seed=args.seed + i, size=size, ensemble=DIHEDRAL).float()
                                      for i in range(0, len(hr), args.batch_size)])
            ensemble_seconds = (time.perf_counter() - started) / len(hr)
        lr_uint8 = (pairs.lr.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        theirs, peer_seconds = _peer(int(scale), lr_uint8)
        theirs = torch.from_numpy(theirs.copy()).permute(0, 3, 1, 2).float() / 255
        theirs = theirs[..., : size[0], : size[1]]
        bicubic = psnr(bicubic_upsample(pairs.lr, size).float().clamp(0, 1), hr).mean().item()
        hndsr_psnr = psnr(ours.clamp(0, 1), hr).mean().item()
        esrgan_psnr = psnr(theirs, hr).mean().item()
        rows[f"{scale:g}"] = {"tiles": len(hr), "bicubic_psnr": round(bicubic, 4), "hndsr_psnr": round(hndsr_psnr, 4),
                              "esrgan_psnr": round(esrgan_psnr, 4),
                              "hndsr_gain": round(hndsr_psnr - bicubic, 4), "esrgan_gain": round(esrgan_psnr - bicubic, 4),
                              "hndsr_seconds_per_tile": round(ours_seconds, 4),
                              "esrgan_seconds_per_tile": round(float(np.mean(peer_seconds)), 4)}
        r = rows[f"{scale:g}"]
        if ensemble is not None:
            r["hndsr_ensemble_gain"] = round(psnr(ensemble.clamp(0, 1), hr).mean().item() - bicubic, 4)
            r["hndsr_ensemble_seconds_per_tile"] = round(ensemble_seconds, 4)
        print(f"| x{scale:g} | {len(hr)} | {bicubic:.2f} | {r['hndsr_gain']:+.2f} dB | {r['esrgan_gain']:+.2f} dB | "
              f"{ours_seconds:.3f} | {r['esrgan_seconds_per_tile']:.3f} |", flush=True)
        if ensemble is not None:
            print(f"|   self-ensemble | | | {r['hndsr_ensemble_gain']:+.2f} dB | | {ensemble_seconds:.3f} | |", flush=True)
    digest = dataset_hash(args.data)
    report = {"split": args.split, "dataset_hash": digest, "hndsr_steps": steps,
              "peer": "@upscalerjs/esrgan-thick 1.0.0, @tensorflow/tfjs 4.11.0 wasm, 1 thread", "scales": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"written to {args.out}")
    if args.split == "test":
        _add_to_evaluation(args, digest, rows)


def _add_to_evaluation(args, digest: str, rows: dict) -> None:
    """The evaluation report gains the peer's column: the evaluate run of this dataset and these weights in
    MLflow gets esrgan_psnr_x<s> and esrgan_gain_x<s> beside its test_psnr_x<s>."""
    from training import tracking

    models = {stage: weights_hash(Path(args.models) / stage) for stage in STAGES}
    metrics = {f"esrgan_{name}_x{scale}": row[f"esrgan_{name}"] for scale, row in rows.items()
               for name in ("psnr", "gain")}
    run_id = tracking.add_to_evaluation(experiment=args.experiment, dataset_hash=digest, models=models,
                                        metrics=metrics, tags={"peer": "@upscalerjs/esrgan-thick 1.0.0"})
    if run_id is None:
        print("no evaluate run of this dataset and these weights in MLflow (run `dvc repro evaluate` first); "
              "the figures are in the JSON only")
    else:
        print(f"ESRGAN's figures added to the evaluate run {run_id} in MLflow ({', '.join(sorted(metrics))})")


def _psnr_8bit(output: np.ndarray, hr: np.ndarray, shave: int = 4) -> float:
    a = output[shave:-shave, shave:-shave].astype(np.float64)
    b = hr[shave:-shave, shave:-shave].astype(np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


def _on_images(model, args) -> None:
    from PIL import Image

    from hndsr.images import to_tensor, to_uint8

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    crops = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        left, top = (image.width - args.crop) // 2, (image.height - args.crop) // 2
        crops.append(image.crop((left, top, left + args.crop, top + args.crop)))
    print(f"{len(crops)} images of {args.images}, centre crops of {args.crop} px, LR by Pillow bicubic; PSNR on "
          f"RGB 8-bit, 4 px border shaved; HNDSR {model.defaults.steps} steps")
    print("| scale | bicubic PSNR | HNDSR gain | ESRGAN gain | HNDSR s/image | ESRGAN s/image |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for scale in PEER_SCALES:
        side = args.crop // scale
        bicubic, ours, theirs, ours_seconds, peer_seconds = [], [], [], [], []
        for hr_image in crops:
            hr_image = hr_image.crop((0, 0, side * scale, side * scale))
            lr_image = hr_image.resize((side, side), Image.BICUBIC)
            hr = np.asarray(hr_image)
            bicubic.append(_psnr_8bit(np.asarray(lr_image.resize(hr_image.size, Image.BICUBIC)), hr))
            started = time.perf_counter()
            with torch.no_grad():
                out = model.super_resolve(to_tensor(np.asarray(lr_image)), float(scale), seed=args.seed,
                                          size=hr.shape[:2])
            ours_seconds.append(time.perf_counter() - started)
            ours.append(_psnr_8bit(to_uint8(out)[0], hr))
            peer, seconds = _peer(scale, np.asarray(lr_image)[None])
            peer_seconds += seconds
            theirs.append(_psnr_8bit(peer[0], hr))
        base = float(np.mean(bicubic))
        rows[str(scale)] = {"images": len(crops), "bicubic_psnr": round(base, 4),
                            "hndsr_gain": round(float(np.mean(ours)) - base, 4),
                            "esrgan_gain": round(float(np.mean(theirs)) - base, 4),
                            "hndsr_seconds_per_image": round(float(np.mean(ours_seconds)), 4),
                            "esrgan_seconds_per_image": round(float(np.mean(peer_seconds)), 4)}
        r = rows[str(scale)]
        print(f"| x{scale} | {base:.2f} | {r['hndsr_gain']:+.2f} dB | {r['esrgan_gain']:+.2f} dB | "
              f"{r['hndsr_seconds_per_image']:.3f} | {r['esrgan_seconds_per_image']:.3f} |", flush=True)
    report = {"images": str(args.images), "crop": args.crop, "hndsr_steps": model.defaults.steps,
              "peer": "@upscalerjs/esrgan-thick 1.0.0, @tensorflow/tfjs 4.11.0 wasm, 1 thread", "scales": rows}
    out = Path(args.out).with_name(Path(args.out).stem + "_images.json")
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
