"""The CUDA paths that no CPU can run: the `auto` device, the bfloat16 and compile start-up checks on the GPU, the
engine's pass budget probed from device memory, and DDP on NCCL. Marked `cuda`; skipped where torch sees no CUDA
device (every CI machine). `benchmarks/gpu_check.py` runs them on a GPU (`make gpu-check`)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hndsr.checkpoint import load_model
from hndsr.images import to_tensor, to_uint8
from hndsr.networks import DiffusionUNet, UNetConfig
from hndsr.params import load_common
from hndsr.raster import DataSpec
from inference.acceleration import Acceleration, accelerate, default_max_batch, pass_megapixels, psnr
from inference.engine import Engine, LoadedModel, Tile, _tile_seed
from inference.loader import pick_device
from tests.conftest import REPO, free_port
from tests.serving.test_server import write_model
from training import distributed
from training.runtime import setup_runtime

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")]
CUDA = torch.device("cuda")
RGB = DataSpec.fixed()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cuda") / "models", seed=1)


def test_auto_device_is_the_gpu_for_serving_and_training():
    assert pick_device("auto").type == "cuda"
    assert default_max_batch("auto", CUDA) > 1
    common = dataclasses.replace(load_common(REPO / "params.yaml"), device="auto")
    device, amp = setup_runtime(common)
    assert device.type == "cuda"
    assert amp == torch.cuda.is_bf16_supported()  # bfloat16 autocast only where the GPU has it


def test_bfloat16_and_compiled_unet_pass_their_checks_and_serve_within_the_tolerance(folder):
    model = load_model(folder).to(CUDA)
    acceleration = accelerate(model, CUDA, precision="auto", compile="auto", min_psnr_db=45, max_batch=8)
    assert [c["mode"] for c in acceleration.checks] == ["bfloat16", "compile"], acceleration.checks
    assert all(c["passed"] for c in acceleration.checks), acceleration.checks
    assert (acceleration.precision, acceleration.compiled) == ("bfloat16", True)
    # eight requests batched through the engine: each within the tolerance of the CPU's float32 output
    engine = Engine(CUDA, pass_pixels=4_000_000, max_batch=8)
    served = LoadedModel(model, {"version": "t"}, CUDA, acceleration)
    images = [np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8) for i in range(8)]
    try:
        jobs = [engine.submit(served, RGB.image_to_model(image), 4.0, 2, i, 300) for i, image in enumerate(images)]
        outputs = [RGB.image_from_model(job.future.result(timeout=300), "uint8") for job in jobs]
    finally:
        engine.close()
    reference = load_model(folder)
    for i, (image, output) in enumerate(zip(images, outputs, strict=True)):
        seed = _tile_seed(i, Tile(0, 0, 40, 36))
        expected = to_uint8(reference.super_resolve(to_tensor(image), 4.0, steps=2, seed=[seed]))[0]
        assert output.shape == expected.shape
        assert psnr(torch.from_numpy(output) / 255, torch.from_numpy(expected) / 255) >= 45, i


def test_auto_pass_budget_is_probed_from_free_memory_and_a_pass_of_it_fits(folder):
    model = load_model(folder).to(CUDA)
    acceleration = Acceleration("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    budget = pass_megapixels("auto", model, CUDA, acceleration)
    free, _ = torch.cuda.mem_get_info(CUDA)
    assert budget >= 0.25
    # A pass of (a share of) the budget takes about the memory the probe predicts: linear in its pixels.
    megapixels = min(budget, 64.0)
    edge = int(math.sqrt(megapixels * 1e6) / 4)
    lr = torch.rand(1, 3, edge, edge, device=CUDA)
    torch.cuda.synchronize(CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    before = torch.cuda.memory_allocated(CUDA)
    with torch.inference_mode(), acceleration.autocast(CUDA):
        out = model.super_resolve(lr, 4.0, seed=0)
    torch.cuda.synchronize(CUDA)
    used = torch.cuda.max_memory_allocated(CUDA) - before
    assert torch.isfinite(out).all()
    predicted = 0.5 * free * (out.shape[-2] * out.shape[-1] / 1e6) / budget
    assert used <= 1.5 * predicted, (used, predicted, budget)


def test_ddp_on_nccl_with_one_process_matches_plain_training():
    if not dist.is_nccl_available():
        pytest.fail("this torch build has no NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        distributed._same_software(1)  # all_gather_object over NCCL (what `init` runs for every group)
        box = [{"lr": 1e-3}]
        dist.broadcast_object_list(box, src=0)  # what send_trial / share use
        assert box == [{"lr": 1e-3}]
        torch.manual_seed(0)
        network = DiffusionUNet(UNetConfig(latent_channels=4, width=8, emb_dim=16)).to(CUDA)
        plain = copy.deepcopy(network)
        wrapped = torch.nn.parallel.DistributedDataParallel(network, device_ids=[0])  # as distributed.wrap does
        inputs = (torch.randn(2, 4, 16, 16, device=CUDA), torch.tensor([10, 500], device=CUDA),
                  torch.randn(2, 4, 16, 16, device=CUDA), torch.tensor([2.0, 4.0], device=CUDA))
        for module in (wrapped, plain):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported()):
                loss = module(*inputs).float().pow(2).mean()
            loss.backward()
        for (name, a), b in zip(network.named_parameters(), plain.parameters(), strict=True):
            # the average over one rank is the gradient itself, up to cuDNN's non-deterministic summation order
            assert (a.grad - b.grad).norm() <= 1e-3 * b.grad.norm() + 1e-8, name
    finally:
        dist.destroy_process_group()
