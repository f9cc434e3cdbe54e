"""A small CNN that judges which class an image shows.

It is trained on the data set itself (never on generated images) and only used to score the
generators: a generated image counts as correct when the judge names the class that was asked
for. Saved like the models: a directory with config.json + model.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import ProceduralShapes, batches, data_set_meta
from .loop import lr_at, progress, set_lr, training_device, write_training_json


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 64
    width: int = 24
    # The first conv's stride. 2 halves a 64 px image before the stages; a 32 px image keeps
    # its full resolution (stride 1), else the stages see 16 px and the judge named only 87 %
    # of real held-out images (thin shapes, stars and crosses, lost their detail).
    stem_stride: int = 2

    @classmethod
    def for_size(cls, num_classes: int, image_size: int) -> ClassifierConfig:
        return cls(num_classes, image_size, stem_stride=1 if image_size <= 32 else 2)


class Judge(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> logits (B, num_classes). A stem (stride 2 above 32 px),
    three stages of (conv, stride-2 conv), global average pooling: sees shapes at any
    position, which is what the classes differ in."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width
        layers: list[nn.Module] = [
            nn.Conv2d(3, w, 3, stride=cfg.stem_stride, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        chans = [w, w, 2 * w, 4 * w]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
        """(B, 3, S, S) (clamped to [-1, 1] here) -> class ids (B,)."""
        out = [
            self(images[i : i + batch_size].clamp(-1, 1)).argmax(1)
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out)


def save_judge(judge: Judge, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(judge.config), indent=1) + "\n")
    state = {k: v.detach().float().contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_judge(path: str | Path) -> Judge:
    path = Path(path)
    cfg = ClassifierConfig(**json.loads((path / "config.json").read_text()))
    judge = Judge(cfg)
    state = load_file(str(path / "model.safetensors"))
    # BatchNorm's counters are saved as floats; cast back to the model's dtypes.
    own = judge.state_dict()
    judge.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return judge.eval().requires_grad_(False)


def train_judge(
    out: str | Path,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 3e-3,
    image_size: int = 64,
    seed: int = 0,
    quiet: bool = False,
    device: str | torch.device = "cpu",
) -> float:
    """Train on the built-in set (fresh images every step), save, and return the accuracy on
    1000 held-out images (another seed). ``device``: see ``loop.training_device``."""
    device = training_device(device)
    torch.manual_seed(seed)
    train = ProceduralShapes(steps * batch_size, seed=seed + 7919, image_size=image_size)
    judge = Judge(ClassifierConfig.for_size(len(train.classes), image_size)).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    judge.train()
    bar = progress(steps, 0, "judge classifier", quiet)
    data = batches(train, batch_size, seed)
    for step in range(steps):
        images, labels = next(data)
        images, labels = images.to(device), labels.to(device)
        set_lr(opt, lr_at(step, steps, lr, warmup=50, final_fraction=0.02))
        loss = F.cross_entropy(judge(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    judge.cpu().eval()  # released, and read, on the CPU
    held_out = ProceduralShapes(1000, seed=seed + 104729, image_size=image_size)
    images, labels = held_out.batch(range(1000))
    acc = float((judge.predict(images) == labels).float().mean())
    save_judge(judge, out)
    meta = {
        "held_out_accuracy": acc,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "data_set": data_set_meta("shapes"),
    }
    write_training_json(out, meta, device)
    if not quiet:
        print(f"judge: held-out accuracy {acc:.4f}")
    return acc
