"""`precision: auto`: bf16 for a pretrained model where the hardware computes it natively, fp32 otherwise."""

from types import SimpleNamespace

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


def _stage(name: str, stage: str, *overrides: str) -> SimpleNamespace:
    """What a recipe is given of its pipeline: the block, the stage's name, the pipeline."""
    _, pipeline = load_pipeline(ROOT / "pipelines.yaml", name, list(overrides))
    return SimpleNamespace(config=pipeline.stages.block(stage), stage=stage, pipeline=pipeline)


def test_auto_is_fp32_for_a_scratch_model_and_left_to_the_worker_for_a_pretrained_one():
    assert _stage("demo", "sft").config.precision == "auto" and _stage("demo", "ppo").config.precision == "auto"  # the default
    assert precision.for_stage(_stage("demo", "sft")).precision == "fp32"
    assert precision.for_stage(_stage("demo", "ppo")).precision == "fp32"
    assert precision.for_stage(_stage("smol-sentiment", "ppo")).precision == "auto"
    assert precision.for_stage(_stage("demo", "ppo", "stages.ppo.precision=bf16")).precision == "bf16"  # what the config says stands
    # the evaluation samples and scores with its candidate's model: SmolLM2 in smol-sentiment, which has no sft stage
    assert precision.for_stage(_stage("smol-sentiment", "evaluate"), model_of="ppo").precision == "auto"
    assert precision.for_stage(_stage("demo", "evaluate"), model_of="ppo").precision == "fp32"


@pytest.mark.parametrize("flags, auto", [
    ({"avx2", "avx512f"}, "fp32"),  # AVX-512 without its bf16 instructions emulates bf16
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    (set(), "fp32"),  # no /proc/cpuinfo
])
def test_auto_on_a_cpu_is_bf16_only_where_it_computes_bf16_natively(monkeypatch, flags, auto):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    assert precision.choose("auto", CPU) == auto
    assert precision.choose("fp32", CPU) == "fp32" and precision.choose("bf16", CPU) == "bf16"
    line = precision.describe(auto, CPU)
    assert line.startswith(f"computing in {auto}: ")
    assert ("natively" in line) == (auto == "bf16") and ("emulated" in line) == (auto == "fp32")


def test_the_cpu_flags_are_read_from_every_processor_line_of_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx2 amx_tile\nbugs\t\t: sysret_ss_attrs\n")
    assert precision._cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "avx512_bf16", "amx_tile"}
    assert precision._cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: auto keeps fp32
