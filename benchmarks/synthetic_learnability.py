"""Is the synthetic face-age set learnable? Train a small CNN on it and compare with the mean.

Why: the demo, CI and the integration tests train on ``ageray.data.synthetic``; if its age
cues were invisible at training resolution, every "the model learns" check downstream would
be testing noise. This script trains a randomly initialised ResNet-18 (timm) with a GAP +
linear head over ages 0..100 (label-distribution KL + L1 on the expectation, as in the
papers' base loss) for a few epochs on CPU, on train and test sets drawn with different
seeds (so the test identities are unseen), and prints the test MAE next to the MAE of always
predicting the training mean, overall and per age group (1-17, 18-65, 66+).

Self-contained on purpose: it does not use ``ageray.model`` / ``ageray.losses``.

    python benchmarks/synthetic_learnability.py                  # ~5 min on 2 cores
    python benchmarks/synthetic_learnability.py --sheet-only     # just the contact sheet
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ageray.data.records import ImportReport
from ageray.data.synthetic import iter_synthetic, random_traits, render_face
from ageray.losses import expected_age

HERE = Path(__file__).resolve().parent
GROUPS = ((1, 17), (18, 65), (66, 200))
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` synthetic records and decode them to uint8 (N, 3, S, S) + ages."""
    images, ages = [], []
    for rec in iter_synthetic(None, ImportReport(), num_samples=n, image_size=size, seed=seed):
        img = Image.open(io.BytesIO(rec.image)).convert("RGB")
        images.append(np.asarray(img))
        ages.append(rec.age)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ages, dtype=torch.float32)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - MEAN) / STD


def augment(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random crop after padding (uint8 batch in, uint8 out)."""
    b, _, h, w = x.shape
    flip = torch.rand(b) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * pad + 1, (b, 2))
    for i in range(b):
        oy, ox = int(offs[i, 0]), int(offs[i, 1])
        out[i] = xp[i, :, oy : oy + h, ox : ox + w]
    return out


def gaussian_targets(age: torch.Tensor, sigma: float = 2.0, k: int = 101) -> torch.Tensor:
    grid = torch.arange(k, dtype=torch.float32)
    p = torch.exp(-0.5 * ((grid[None] - age[:, None]) / sigma) ** 2)
    return p / p.sum(1, keepdim=True)


class AgeNet(torch.nn.Module):
    """timm ResNet-18 (random init) -> global average pool -> linear over ages 0..100."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
        self.head = torch.nn.Linear(self.backbone.num_features, 101)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def group_mae(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    out = {}
    for lo, hi in GROUPS:
        m = (y >= lo) & (y <= hi)
        name = f"{lo}-{hi}" if hi < 200 else f"{lo}+"
        out[name] = float(np.abs(y[m] - pred[m]).mean()) if m.any() else float("nan")
    return out


def contact_sheet(path: Path, tile: int = 80) -> None:
    """Faces of six people (both genders, five races) across ages, labelled."""
    ages = [1, 4, 8, 13, 18, 25, 35, 45, 55, 65, 75, 81]
    people = [(0, 0), (1, 0), (0, 1), (1, 2), (0, 3), (1, 4)]
    label_h = 11
    sheet = Image.new("RGB", (tile * len(ages), (tile + label_h) * len(people)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (gender, race) in enumerate(people):
        traits = random_traits(np.random.default_rng([11, r]), gender=gender, race=race)
        for k, age in enumerate(ages):
            face = render_face(float(age), traits, np.random.default_rng([r, k]), tile)
            sheet.paste(face, (k * tile, r * (tile + label_h)))
            draw.text((k * tile + 3, r * (tile + label_h) + tile), f"{age}", fill=(0, 0, 0))
    sheet = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    sheet.save(path, optimize=True)
    print(f"contact sheet: {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet", type=Path, default=HERE / "synthetic_faces.png")
    ap.add_argument("--sheet-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    if args.sheet:
        contact_sheet(args.sheet)
    if args.sheet_only:
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    x_tr, y_tr = load(args.train, seed=args.seed, size=args.size)
    x_te, y_te = load(args.test, seed=args.seed + 1000, size=args.size)
    t_gen = time.perf_counter() - t0
    print(f"generated {len(y_tr)} train + {len(y_te)} test images at {args.size}px in {t_gen:.1f}s")

    model = AgeNet()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * ((len(y_tr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr))
        total, n = 0.0, 0
        te = time.perf_counter()
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            xb, yb = normalise(augment(x_tr[idx])), y_tr[idx]
            logits = model(xb)
            kl = F.kl_div(logits.log_softmax(1), gaussian_targets(yb), reduction="batchmean")
            l1 = (expected_age(logits=logits) - yb).abs().mean()
            loss = kl + 0.1 * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += l1.item() * len(idx)
            n += len(idx)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train MAE {total / n:.2f} "
            f"({time.perf_counter() - te:.0f}s)"
        )
    t_train = time.perf_counter() - t_train

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(y_te), 200):
            preds.append(expected_age(logits=model(normalise(x_te[i : i + 200]))))
    pred = torch.cat(preds).numpy()
    y = y_te.numpy()
    mean_pred = np.full_like(y, float(y_tr.mean()))
    result = {
        "command": "python benchmarks/synthetic_learnability.py "
        f"--train {args.train} --test {args.test} --size {args.size} --epochs {args.epochs}",
        "model_mae": float(np.abs(pred - y).mean()),
        "mean_predictor_mae": float(np.abs(mean_pred - y).mean()),
        "model_group_mae": group_mae(y, pred),
        "mean_group_mae": group_mae(y, mean_pred),
        "test_group_counts": {
            f"{lo}-{hi}" if hi < 200 else f"{lo}+": int(((y >= lo) & (y <= hi)).sum())
            for lo, hi in GROUPS
        },
        "generate_s": round(t_gen, 1),
        "train_s": round(t_train, 1),
        "threads": args.threads,
    }
    ratio = result["model_mae"] / result["mean_predictor_mae"]
    print(json.dumps(result, indent=2))
    print(
        f"test MAE {result['model_mae']:.2f} vs mean-predictor {result['mean_predictor_mae']:.2f} "
        f"(ratio {ratio:.2f}; target < 0.6)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
