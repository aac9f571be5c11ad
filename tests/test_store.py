import json
import threading
from pathlib import Path

import pytest

from rlhf.store import StageDir, digest_tree, fingerprint, write_json_atomic


def test_fingerprint_changes_exactly_with_config_seed_and_inputs():
    base = fingerprint("data", {"a": 1, "b": {"c": 2}}, 0, {"up": "d1"})
    assert fingerprint("data", {"b": {"c": 2}, "a": 1}, 0, {"up": "d1"}) == base  # key order is not content
    assert fingerprint("data", {"a": 2, "b": {"c": 2}}, 0, {"up": "d1"}) != base
    assert fingerprint("data", {"a": 1, "b": {"c": 2}}, 1, {"up": "d1"}) != base
    assert fingerprint("data", {"a": 1, "b": {"c": 2}}, 0, {"up": "d2"}) != base
    assert fingerprint("sft", {"a": 1, "b": {"c": 2}}, 0, {"up": "d1"}) != base


def test_digest_follows_content_not_location_or_time(tmp_path: Path):
    for name in ("one", "two"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "x.bin").write_bytes(b"abc")
        (tmp_path / name / "y.txt").write_text("hello")
    assert digest_tree(tmp_path / "one") == digest_tree(tmp_path / "two")
    (tmp_path / "two" / "y.txt").write_text("hellp")
    assert digest_tree(tmp_path / "one") != digest_tree(tmp_path / "two")
    (tmp_path / "two" / "y.txt").write_text("hello")
    (tmp_path / "two" / "y.txt").rename(tmp_path / "two" / "z.txt")  # names count too
    assert digest_tree(tmp_path / "one") != digest_tree(tmp_path / "two")


def test_manifest_is_never_half_written(tmp_path: Path):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"ok": 1})

    class Exploding:
        def __str__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"a": "x" * 100_000, "b": Exploding()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_complete_promotes_outputs_then_writes_manifest(tmp_path: Path):
    stage = StageDir.of(tmp_path, "p", "data", "abc")
    assert stage.manifest() is None
    (stage.new_outputs() / "f.txt").write_text("1")
    stage.complete(MANIFEST)
    assert (stage.outputs / "f.txt").read_text() == "1"
    assert stage.manifest() == MANIFEST
    assert not stage.work.exists()
    # a forced rerun replaces the outputs it recomputed
    (stage.new_outputs() / "g.txt").write_text("2")
    stage.complete(MANIFEST | {"n": 2})
    assert [p.name for p in stage.outputs.iterdir()] == ["g.txt"]


MANIFEST = {"fingerprint": "abc", "outputs": {"digest": "d"}, "metrics": {"rows": 1.0}, "mlflow_run_id": "r"}


@pytest.mark.parametrize("damage", [lambda text: text[: len(text) // 2], lambda text: "[]", lambda text: '{"fingerprint": "abc"}'])
def test_a_damaged_manifest_counts_as_not_run_and_says_so(tmp_path: Path, caplog, damage):
    stage = StageDir.of(tmp_path, "p", "data", "abc")
    stage.new_outputs()
    stage.complete(MANIFEST)
    path = stage.root / "manifest.json"
    path.write_text(damage(path.read_text()))
    assert stage.manifest() is None
    assert f"{path} is damaged" in caplog.text


def test_lock_is_exclusive_across_holders(tmp_path: Path):
    stage = StageDir.of(tmp_path, "p", "data", "abc")
    assert not stage.is_busy()
    held, release = threading.Event(), threading.Event()

    def hold():
        with stage.lock():
            held.set()
            release.wait(10)

    # filelock locks are re-entrant per object and thread; another thread must not get in
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        assert stage.is_busy()
    finally:
        release.set()
        thread.join()
    assert not stage.is_busy()
