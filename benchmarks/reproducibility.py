"""How far the pipeline's results move when the CPU underneath changes.

Runs `dvc repro evaluate` (ETL, the three training stages, evaluation) in fresh copies of the repository, once
per CPU configuration, and compares what they produce: the dataset hash and split files, each stage's weights,
the sampling defaults chosen on validation, and the test metrics per scale. On the CPU the pipeline uses
PyTorch's deterministic algorithms, so one machine type repeats itself byte for byte (tests/test_dvc_pipeline.py
checks that); another machine type runs other vector kernels (AVX2 instead of AVX-512, other BLAS paths), whose
floating-point rounding differs. This script emulates that on one machine by capping the instruction sets
PyTorch, oneDNN and MKL may use, which is what a CPU without AVX-512 would run:

    python benchmarks/reproducibility.py                       # default params.yaml: about 2 x 8 min on 2 cores
    python benchmarks/reproducibility.py --configs native avx2 --params profiles/gpu.yaml

Configurations: `native` (what this CPU offers), `avx2`, `baseline` (no vector extensions: ATen's default
kernels, oneDNN and MKL at SSE4.1), `threads1` (native kernels on one thread). Prints a table per item and
the largest differences; compares the `native` run with the committed metrics/eval.json too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", ".dvcignore", ".dvc/config", "hndsr", "pipeline", "training", "registry"]
CONFIGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "threads1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(config: str, params: Path, workdir: Path) -> dict:
    """Run the pipeline up to evaluation in a fresh copy under `workdir` with `config`'s environment."""
    root = workdir / config
    root.mkdir()
    for name in COPY:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    shutil.copy(params, root / "params.yaml")
    env = {**os.environ, **CONFIGS[config], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=root, check=True, env=env)
    start = time.perf_counter()
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                env=env, capture_output=True, text=True).stdout.strip()
    print(f"[{config}] dvc repro evaluate (torch CPU capability {capability}) in {root}", flush=True)
    result = subprocess.run(["dvc", "repro", "evaluate"], cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"[{config}] dvc repro failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    processed = root / "data" / "processed"
    diffusion = json.loads((root / "models" / "diffusion" / "config.json").read_text())
    return {
        "capability": capability,
        "seconds": time.perf_counter() - start,
        "dataset_hash": json.loads((processed / "manifest.json").read_text())["dataset_hash"],
        "splits": {p.name: _sha(p) for p in sorted(processed.glob("*.parquet"))},
        "weights": {s: _sha(root / "models" / s / "model.safetensors") for s in ("autoencoder", "operator", "diffusion")},
        "sampling": diffusion.get("sampling"),
        "eval": json.loads((root / "metrics" / "eval.json").read_text()),
        "eval_bytes": (root / "metrics" / "eval.json").read_bytes(),
    }


def report(results: dict[str, dict]) -> None:
    names = list(results)
    first = results[names[0]]
    print("\n| item | " + " | ".join(f"{n} ({results[n]['capability']})" for n in names) + " | same |")
    print("|---" * (len(names) + 2) + "|")

    def row(label: str, values: list) -> None:
        same = "yes" if all(v == values[0] for v in values) else "no"
        print(f"| {label} | " + " | ".join(str(v) for v in values) + f" | {same} |")

    row("dataset hash", [r["dataset_hash"][:12] for r in results.values()])
    for split in first["splits"]:
        row(f"{split} sha256", [r["splits"][split][:12] for r in results.values()])
    for stage in first["weights"]:
        row(f"{stage} weights sha256", [r["weights"][stage][:12] for r in results.values()])
    row("sampling (steps, temperature, strength)",
        [tuple(r["sampling"][k] for k in ("steps", "temperature", "strength")) for r in results.values()])
    row("wall time, s", [round(r["seconds"]) for r in results.values()])

    print("\n| scale | metric | " + " | ".join(names) + " | max - min |")
    print("|---" * (len(names) + 3) + "|")
    spread = {}
    for scale in first["eval"]["scales"]:
        for metric in ("psnr", "ssim", "prior_psnr", "bicubic_psnr", "gain"):
            values = []
            for r in results.values():
                scores = r["eval"]["scales"][scale]
                values.append(scores["psnr"] - scores["bicubic_psnr"] if metric == "gain" else scores[metric])
            spread[(scale, metric)] = max(values) - min(values)
            print(f"| x{scale} | {metric} | " + " | ".join(f"{v:.4f}" for v in values)
                  + f" | {spread[(scale, metric)]:.4f} |")
    for metric in ("psnr", "ssim", "prior_psnr", "gain"):
        worst = max(v for (s, m), v in spread.items() if m == metric)
        print(f"largest spread of {metric} over scales: {worst:.4f}" + (" dB" if metric != "ssim" else ""))
    committed = REPO / "metrics" / "eval.json"
    if "native" in results and committed.is_file():
        same = results["native"]["eval_bytes"] == committed.read_bytes()
        print(f"native run's metrics/eval.json {'is byte-identical to' if same else 'DIFFERS from'} the committed one")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Configurations: " + ", ".join(CONFIGS))
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["native", "avx2"],
                        help="CPU configurations to compare (default: native avx2)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        results = {c: run(c, args.params.resolve(), args.keep) for c in args.configs}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = {c: run(c, args.params.resolve(), Path(tmp)) for c in args.configs}
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
