"""A small CNN that judges which class an image shows.

It is trained on the data set itself (the built-in set, or a folder's training split; never on
generated images) and only used to score the generators, never in a loss: a generated image
counts as correct when the judge names the class that was asked for. Saved like the models:
a directory with config.json + model.safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import batches, data_set_meta, held_out_set, open_source
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
    data: str = "shapes",
) -> float | None:
    """Train on ``data``, save, and return the accuracy on held-out images: the built-in set
    (fresh images every step; 1000 held-out images of another seed) or a folder's training
    split (its held-out split; None when it has none). ``device``: see
    ``loop.training_device``."""
    device = training_device(device)
    torch.manual_seed(seed)
    source = open_source(data, image_size, size=steps * batch_size, seed=seed + 7919)
    judge = Judge(ClassifierConfig.for_size(source.num_classes, image_size)).to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    judge.train()
    bar = progress(steps, 0, "judge classifier", quiet)
    batch_stream = batches(source.dataset, batch_size, seed)
    for step in range(steps):
        images, labels = next(batch_stream)
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
    acc, held_out = _held_out_accuracy(judge, data, image_size, seed)
    save_judge(judge, out)
    meta = {
        "held_out_accuracy": acc,
        "held_out_images": held_out,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "data_set": data_set_meta(data),
        "classes": list(source.classes),
    }
    write_training_json(out, meta, device)
    if not quiet:
        said = "no held-out images" if acc is None else f"{acc:.4f} on {held_out} images"
        print(f"judge: held-out accuracy {said}")
    return acc


def _held_out_accuracy(
    judge: Judge, data: str, image_size: int, seed: int
) -> tuple[float | None, int]:
    """(accuracy, images) on the built-in set's 1000 held-out images of another seed than
    training's, or on all of a folder's held-out split ((None, 0) when it has none)."""
    try:
        held_out = held_out_set(data, image_size, 1000, seed=seed + 104729)
    except ValueError:  # a folder whose classes have fewer than ten images each
        return None, 0
    correct = 0
    for start in range(0, len(held_out), 1000):
        images, labels = held_out.batch(range(start, min(len(held_out), start + 1000)))
        correct += int((judge.predict(images) == labels).sum())
    return correct / len(held_out), len(held_out)
