"""Pieces shared by the trainers: optimiser, learning-rate schedule, resumable checkpoints,
progress bars and thread settings (including cores shared by processes side by side)."""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..usage import UsageError
from .ema import EMA


def set_threads(threads: int | None) -> None:
    """Default: all cores this process may use, at most 2 (the shared build machine has 2)."""
    if threads is None:
        threads = min(2, len(os.sched_getaffinity(0)))
    torch.set_num_threads(max(1, int(threads)))


def training_device(name: str | torch.device | None = "cpu") -> torch.device:
    """Where a trainer runs. "auto" (the command line's default) takes the GPU when torch sees
    one and the CPU otherwise; "cpu", "cuda" or "cuda:1" ask for one. It is the same training,
    not the same bits: on one H200 the recipe's stages ran 6 to 13 times their 2-core rates
    (docs/DEMO_MODELS_LOG.md, twenty-seventh pass).
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU here (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: training runs on cpu or cuda")
    return device


def write_training_json(out: str | Path, meta: dict, device: torch.device | None = None) -> None:
    """A finished model's training.json: ``meta`` and the machine that made it."""
    meta = {**meta, "machine": machine_meta(device)}
    (Path(out) / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def machine_meta(device: torch.device | None = None) -> dict:
    """Where a model was trained (training.json's "machine"). The same recipe and seed give the
    same bits only on the same CPU kind and thread count (docs/DEMO_MODELS_LOG.md, twentieth and
    twenty-first passes: one run on an AMD EPYC made a weaker tokenizer than the Intel Xeon
    runs), so a model that does not reproduce can be traced to the machine that made it."""
    cpuinfo = _cpuinfo()
    return {
        "cpu": cpuinfo.get("model name") or platform.processor() or platform.machine(),
        # A virtual machine's model name can hide the generation ("AMD EPYC" is Zen 3 or
        # Zen 4, AVX2 or AVX-512 kernels): family / model and the kernel level torch picked
        # tell two such machines apart (docs/DEMO_MODELS_LOG.md, twenty-fourth pass).
        "cpu_family_model": "/".join(cpuinfo.get(k, "?") for k in ("cpu family", "model")),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **_accelerator(device),
    }


def _accelerator(device: torch.device | None) -> dict:
    """training.json's "device" (and the GPU's name) where a model was not trained on the CPU;
    nothing for a CPU run, so CPU runs' files stay as they were."""
    if device is None or device.type == "cpu":
        return {}
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device)}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class CoreShare:
    """The cores of one machine, shared by training processes that run side by side.

    Each process holds a lease (a file named after its pid) in ``directory`` while it trains
    and calls ``rebalance()`` after every step; that gives it ``cores // live leases`` threads
    (at least one). So when one process finishes, the others take its cores: in train-demo the
    64-token generator, the longest stage, moves to both cores of a 2-core machine once the
    32-token chain is done instead of leaving one idle for hours. (torch's thread count must
    be set from the training thread itself, hence a call in the loop and not a watcher.)
    """

    def __init__(self, directory: str | Path, cores: int, name: str = "", quiet: bool = True):
        self.directory = Path(directory)
        self.cores = max(1, int(cores))
        self.name = name
        self.quiet = quiet
        self.lease = self.directory / str(os.getpid())
        self._next_check = 0.0

    @staticmethod
    def clear(directory: str | Path) -> None:
        """Drop the leases a killed run left behind (only the process that starts the others
        calls this)."""
        for lease in Path(directory).glob("*"):
            lease.unlink(missing_ok=True)

    def __enter__(self) -> CoreShare:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lease.touch()
        self.rebalance(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.lease.unlink(missing_ok=True)

    def live_leases(self) -> int:
        live = 0
        for lease in self.directory.glob("*"):
            if lease.name.isdigit() and process_alive(int(lease.name)):
                live += 1
        return max(1, live)

    def threads(self) -> int:
        return max(1, self.cores // self.live_leases())

    def rebalance(self, force: bool = False) -> None:
        """Set this process's threads to its share; looks at the leases every 5 s at most."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + 5.0
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            # Not on entering: the caller may set its own count next (train-demo's tokenizers
            # train on a fixed one), so only a change while training is news.
            if not self.quiet and not force:
                tqdm.write(f"{self.name or 'training'}: {threads} thread(s) from now on")


def write_json(path: Path, record: dict) -> None:
    """``record`` as one line of JSON, replacing ``path`` at once: a process reading it (the
    next run, train-demo's board) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


class RunClock:
    """Wall time of a job that may be killed and resumed (train-demo): each run adds its own
    time to a small JSON file in the work directory, rewritten every ``every`` seconds while it
    runs (so a killed run loses at most that much) and read back by the next run."""

    def __init__(self, path: str | Path, every: float = 30.0):
        self.path = Path(path)
        self.every = every
        self.before, self.runs = 0.0, 1
        self._start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def elapsed(self) -> float:
        """Seconds of this run so far."""
        return time.monotonic() - self._start

    def total(self) -> float:
        """Seconds of every run in this work directory, this one included."""
        return self.before + self.elapsed()

    def _write(self) -> None:
        write_json(self.path, {"seconds": round(self.total(), 1), "runs": self.runs})

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def __enter__(self) -> RunClock:
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.before, self.runs = float(saved["seconds"]), int(saved["runs"]) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = time.monotonic()
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and other 1-D / token parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name and "token" not in name else no_decay).append(
            p
        )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, base: float, warmup: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_fraction`` of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def save_checkpoint(path: Path, step: int, model: nn.Module, ema: EMA, opt, extra: dict) -> None:
    """Everything needed to continue bit-for-bit: weights, EMA, optimiser, RNG, step.
    Written to a temporary file and renamed, so a kill mid-write leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra,
    }
    device = device_of(model)
    if device.type == "cuda":  # the GPU's own generator draws the noise there
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, ema: EMA, opt) -> tuple[int, dict]:
    """Restore a checkpoint written by ``save_checkpoint``; returns (step, extra)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    device = device_of(model)
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"]), state["extra"]


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the device its inputs must go to)."""
    return next(model.parameters()).device


def progress(total: int, start: int, desc: str, quiet: bool = False):
    """A tqdm bar; in a train-demo stage process, a bar published to its board
    (``board.PublishedBar``: several processes' bars cannot share one terminal line)."""
    from .board import PublishedBar, published_dir  # board imports this module

    if published_dir() is not None and not quiet:
        return PublishedBar(published_dir(), total, start, desc)
    return tqdm(
        total=total,
        initial=start,
        desc=desc,
        disable=quiet,
        dynamic_ncols=True,
        mininterval=2.0,
        smoothing=0.05,
    )
