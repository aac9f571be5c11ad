"""What a stage computes in when its block says `precision: auto`, the default.

bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and the
model descends from a pretrained one; fp32 otherwise. Where bf16 is emulated (an AVX2 CPU) it took several
times fp32's time, and a scratch model is too small for its matmuls to gain. The driver settles the model
side (`for_stage`), the worker the hardware side (`choose`): a Ray worker may run on another machine.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlhf import models

_NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def for_stage(ctx, model_of: str | None = None):
    """The block of the stage `ctx` (`rlhf.lifecycle.StageContext`) runs, with `auto` settled to fp32 for a
    scratch model; a pretrained one keeps `auto`. The model is the one `model_of` trains (default: this stage)."""
    config = ctx.config
    if config.precision == "auto" and not ctx.pipeline.stages.pretrained(model_of or ctx.stage):
        return config.model_copy(update={"precision": "fp32"})
    return config


def choose(setting: str, device: torch.device) -> str:
    """The precision a stage whose block says `setting` computes in on `device`."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "fp32"


def dtype(chosen: str) -> torch.dtype | None:
    """What frozen weights are loaded in to compute in `chosen`: bf16, or None (the loaders' fp32)."""
    return torch.bfloat16 if chosen == "bf16" else None


def frozen(load, directory: Path, chosen: str, device: torch.device):
    """A model that only samples and scores, read by `load` (a `models` loader) to compute in `chosen` on `device`."""
    return attention(load(directory, dtype(chosen)), chosen, device)


def attention(model, chosen: str, device: torch.device):
    """`model`, attending eagerly where it computes in bf16 on a CPU: SDPA's kernels took 2-5x eager
    attention's time there, forward and back."""
    if chosen == "bf16" and device.type == "cpu":
        models.unwrapped(model).set_attn_implementation("eager")
    return model


def describe(chosen: str, device: torch.device) -> str:
    """The line a stage's log starts with: what it computes in, and what the hardware offers."""
    return f"computing in {chosen}: {native_bf16(device) or f'bf16 is emulated on this {_hardware(device)}'}"


def native_bf16(device: torch.device) -> str | None:
    """Why `device` computes bf16 natively, or None."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} computes bf16 natively" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        flags = _cpu_flags()
        native = [flag for flag in _NATIVE_CPU_FLAGS if flag in flags]
        return f"the CPU computes bf16 natively ({', '.join(native)})" if native else None
    return None


def _hardware(device: torch.device) -> str:
    if device.type == "cpu":
        return f"CPU (no {' or '.join(_NATIVE_CPU_FLAGS)})"
    return device.type


@functools.cache
def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; none elsewhere (auto then keeps fp32)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split())
