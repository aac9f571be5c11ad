"""Resume picks the newest checkpoint whose files still match the seal written when it was saved."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf import training


def save(trainer_dir: Path, step: int, seal: bool = True) -> Path:
    checkpoint = trainer_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        args, state = SimpleNamespace(output_dir=str(trainer_dir)), SimpleNamespace(is_world_process_zero=True, global_step=step)
        training.SealCheckpoints().on_save(args, state, None)
    return checkpoint


def test_a_damaged_or_unsealed_checkpoint_is_passed_over_for_the_one_before(tmp_path, caplog):
    trainer_dir = tmp_path / "trainer"
    assert training.resume_point(trainer_dir) == (None, 0)
    save(trainer_dir, 5)
    newest = save(trainer_dir, 10)
    save(trainer_dir, 15, seal=False)  # a crash between saving and sealing
    assert training.resume_point(trainer_dir) == (str(newest), 10)

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    assert training.resume_point(trainer_dir) == (str(trainer_dir / "checkpoint-5"), 5)
    assert f"{newest} is damaged" in caplog.text


def test_seals_of_checkpoints_the_trainer_rotated_out_go_with_them(tmp_path):
    trainer_dir = tmp_path / "trainer"
    old = save(trainer_dir, 5)
    for path in old.iterdir():
        path.unlink()
    old.rmdir()
    save(trainer_dir, 10)
    assert sorted(p.name for p in trainer_dir.glob("*.sha256")) == ["checkpoint-10.sha256"]


def test_a_stage_after_others_in_one_process_reports_its_own_peak_memory():
    held = torch.ones(2**27)  # 512 MiB, resident once written
    del held
    before = training.peak_rss_mb()
    training.reset_peak_rss()
    assert training.peak_rss_mb() < before - 400


def _resident_mb() -> float:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:")) / 1024


def test_memory_an_earlier_stage_freed_between_live_blocks_goes_back_before_the_peak_is_reset():
    blocks = [bytearray(64 * 1024) for _ in range(8000)]  # 500 MiB of heap blocks glibc does not map one by one
    kept = blocks[::2]  # every other one stays alive, so the freed half is holes that glibc keeps unless trimmed
    del blocks
    before = _resident_mb()
    training.reset_peak_rss()
    assert _resident_mb() < before - 150
    assert len(kept) == 4000
