"""Which device a run uses and which speed switches that device gets ("auto" = on for CUDA, off on CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError, TrainingError
from engine.config import Config
from engine.distributed import DistInfo


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    dist = dist or DistInfo()
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA device is available; use run.device=cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class Speed:
    """The speed switches resolved for this device ("auto" = on for CUDA, off on CPU)."""

    amp_dtype: torch.dtype | None
    grad_scaler: bool
    channels_last: bool
    compile: bool
    fused_sgd: bool
    tf32: bool = False  # fp32 matmuls/convolutions (and the fused head's fp32 GEMMs) on TF32 tensor cores


def resolve_speed(cfg: Config, device: torch.device) -> Speed:
    cuda = device.type == "cuda"

    def on(value: str) -> bool:
        return value == "on" or (value == "auto" and cuda)

    amp = {"auto": "bf16" if cuda else "off"}.get(cfg.run.amp, cfg.run.amp)
    if amp == "fp16" and not cuda:
        raise ConfigError("run.amp=fp16 needs CUDA (GradScaler); use run.amp=bf16 or off on CPU")
    if on(cfg.optim.fused) and not cuda:
        raise ConfigError("optim.fused=on needs CUDA parameters; use optim.fused=auto or off on CPU")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if on(cfg.run.tf32) and not cuda:
        raise ConfigError("run.tf32=on needs CUDA (TF32 is a tensor-core format); use run.tf32=auto or off on CPU")
    return Speed(dtype, amp == "fp16", on(cfg.run.channels_last), on(cfg.run.compile), on(cfg.optim.fused),
                 on(cfg.run.tf32))


def apply_speed(speed: Speed, cfg: Config, device: torch.device) -> None:
    """The process-wide switches: flush denormals on the CPU; cuDNN autotuning and TF32 on CUDA."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # late in training, float32 denormals cost ~6× on x86 CPUs
        return
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32  # the fused head reads this too (kernels.fused_head)
    torch.backends.cudnn.allow_tf32 = speed.tf32
