"""`precision: auto`: bf16 for a pretrained model where the hardware computes it natively, fp32 otherwise."""

import platform

import pytest
import torch

from conftest import ROOT
from rlhf import precision
from rlhf.config import load_pipeline

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, pretrained", [
    ("demo", {"sft": False, "reward": False, "ppo": False}),  # everything descends from the scratch SFT model
    ("smol-sentiment", {"reward": True, "ppo": True}),  # the policy is SmolLM2, given to the RL stage itself
    ("hh-rlhf", {"sft": True, "reward": True, "ppo": True}),  # SmolLM2 through SFT
])
def test_a_stage_knows_whether_its_model_descends_from_a_pretrained_one(name, pretrained):
    _, pipeline = load_pipeline(ROOT / "pipelines.yaml", name)
    assert {stage: pipeline.stages.pretrained(stage) for stage in pretrained} == pretrained


def test_auto_is_fp32_for_a_scratch_model_and_left_to_the_worker_for_a_pretrained_one():
    _, demo = load_pipeline(ROOT / "pipelines.yaml", "demo")
    assert demo.stages.sft.precision == "auto" and demo.stages.ppo.precision == "auto"  # the default
    assert precision.for_model(demo.stages.sft, pretrained=False).precision == "fp32"
    assert precision.for_model(demo.stages.sft, pretrained=True).precision == "auto"
    chosen = demo.stages.ppo.model_copy(update={"precision": "bf16"})
    assert precision.for_model(chosen, pretrained=False).precision == "bf16"  # what the config says stands


@pytest.mark.parametrize("flags, auto", [
    ({"avx2", "avx512f"}, "fp32"),  # AVX-512 without its bf16 instructions emulates bf16
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    (set(), "fp32"),  # no /proc/cpuinfo
])
def test_auto_on_a_cpu_is_bf16_only_where_it_computes_bf16_natively(monkeypatch, flags, auto):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.choose("auto", CPU) == auto
    assert precision.choose("fp32", CPU) == "fp32" and precision.choose("bf16", CPU) == "bf16"
    line = precision.describe(auto, CPU)
    assert line.startswith(f"computing in {auto}: ")
    assert ("natively" in line) == (auto == "bf16") and ("emulated" in line) == (auto == "fp32")


@pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux", reason="reads Linux's x86 flags")
def test_this_machines_cpu_flags_are_read():
    assert "sse2" in precision._cpu_flags()  # every x86-64 CPU has it
