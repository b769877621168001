"""The GPU path, on a CUDA device (``pytest -m cuda``; every test skips with a reason
without one). ``python -m benchmarks.gpu_check`` runs this file first on the GPU machine,
whose Python has torch, torchvision, timm, numpy, Pillow, pyyaml, safetensors, pytest and
the packed webdataset wheel, and nothing else: this file imports nothing more.

What it holds the GPU path to: batches, model and optimiser state on the device; the routed
prediction in bf16 equal to float32 within the stated tolerance; the batched augmentation on
the GPU equal to the same parameters on the CPU; every evaluation sample seen exactly once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ageray.config import AugmentConfig, Config, DataConfig, ModelConfig
from ageray.data.augment import BatchAugment, augment_generator, decode_size

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

#: bf16 routed prediction vs float32 (same model, same images): per-sample age within this
#: many years, and the routing choice the same for at least this share of the images (a
#: choice can flip where the two heads' KLs are within bf16's rounding of each other).
BF16_AGE_TOLERANCE = 1.0
BF16_MEAN_AGE_TOLERANCE = 0.25
BF16_SAME_CHOICE = 0.9


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    out = tmp_path_factory.mktemp("cuda-shards")
    records = iter_synthetic(num_samples=120, image_size=64, images_per_identity=4, seed=0)
    write_shards(records, out, max_count=16, workers=1, progress=False)
    return str(out)


def _config(shards: str, **data: object) -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(
        cfg.data,
        shards=shards,
        image_size=64,
        batch_size=8,
        eval_batch_size=7,
        num_workers=2,
        augment=AugmentConfig(randaugment_n=2),
        **data,
    )
    cfg.model = ModelConfig(backbone="resnet18", head="glae", channels_last=True)
    cfg.train.stage1.epochs = 1
    cfg.train.stage1.optim.lr = 0.01
    cfg.train.log_every = 0
    return cfg


def test_training_runs_on_the_device(shards: str, tmp_path: Path) -> None:
    """One stage-1 epoch in-process on the GPU with device augmentation: batches arrive
    on the device, the optimiser is torch's fused one, the checkpoint loads on the CPU."""
    from ageray.config import to_dict
    from ageray.data.loader import train_loader
    from ageray.model import load_model
    from ageray.training.loop import run_local
    from ageray.training.optim import build_optimizer
    from ageray.training.plans import StageSpec

    cfg = _config(shards, augment_on="device")
    batch = next(iter(train_loader(cfg.data, "train", device="cuda")))
    assert batch["image"].is_cuda and batch["age"].is_cuda
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[-1] == 64
    params = [torch.nn.Parameter(torch.zeros(3, 3, device="cuda"))]
    assert build_optimizer(params, cfg.train.stage1.optim, 8, fused=True).defaults["fused"]
    metrics, ctx = run_local(StageSpec(stage="stage1", config=to_dict(cfg)), tmp_path)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert metrics["val_samples"] > 0
    model, _ = load_model(ctx.checkpoints[-1])
    assert next(model.parameters()).device.type == "cpu"


def test_bf16_routed_prediction_matches_float32(tmp_path: Path) -> None:
    from datagen import make_tiny_model
    from model_predict import predict

    from ageray.inference import autocast
    from ageray.model import load_model

    model, _ = load_model(make_tiny_model(tmp_path / "m"), map_location="cuda")
    model = model.to(memory_format=torch.channels_last)
    device = torch.device("cuda")
    images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    full = predict(model, images, flip=True)
    with autocast(device, "bf16"):
        half = predict(model, images, flip=True)
    for name in ("vanilla", "balanced"):
        gap = (full.heads[name]["age"] - half.heads[name]["age"]).abs()
        assert float(gap.max()) <= BF16_AGE_TOLERANCE, name
        assert float(gap.mean()) <= BF16_MEAN_AGE_TOLERANCE, name
    same = full.head == half.head
    assert float(same.float().mean()) >= BF16_SAME_CHOICE
    routed_gap = (full.age - half.age).abs()[same]
    assert float(routed_gap.max()) <= BF16_AGE_TOLERANCE


def test_device_augmentation_equals_cpu() -> None:
    """The same parameters on the GPU and the CPU give the same batch (float rounding
    apart: bilinear sampling and the hue arithmetic differ in the last bits)."""
    data = DataConfig(image_size=64, augment=AugmentConfig(randaugment_n=2, randaugment_m=9))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, decode_size(data), decode_size(data)), dtype=torch.uint8,
                           generator=generator)  # fmt: skip
    aug = BatchAugment(data)
    params = aug.sample(32, tuple(images.shape[-2:]), augment_generator(seed=0, epoch=0, rank=0))
    on_cpu = aug.apply(images, params)
    on_gpu = aug.apply(images.cuda(), params)
    assert on_gpu.device.type == "cuda"
    close = (on_gpu.cpu() - on_cpu).abs() < 0.05
    assert float(close.float().mean()) > 0.995


def test_evaluation_sees_every_sample_once_on_the_device(shards: str) -> None:
    from ageray.data.loader import eval_loader
    from ageray.data.manifest import read_manifest

    cfg = _config(shards)
    expected = read_manifest(shards)["splits"]["test"]["count"]
    loader = eval_loader(cfg.data, "test", device="cuda")
    keys: list[str] = []
    for batch in loader:
        assert batch["image"].is_cuda
        keys.extend(batch["key"])
    assert len(keys) == len(set(keys)) == expected == loader.num_samples
