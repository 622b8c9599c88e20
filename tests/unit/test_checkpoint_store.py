"""CheckpointStore on real files: atomic commit, manifest verification, rotation, cleanup, disk faults."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import steadyfit.checkpoint
import steadyfit.checkpoint.atomic
import steadyfit.checkpoint.manifest
import steadyfit.checkpoint.store
from helpers import base_config, make_mlp, make_regression
from steadyfit import Trainer
from steadyfit.checkpoint import CheckpointError, CheckpointStore
from steadyfit.state import FitResult

SRC_DIR = Path(steadyfit.checkpoint.__file__).resolve().parents[2]


def model_state(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((4, 3), value), "layer.bias": torch.arange(3, dtype=torch.bfloat16)}


def components(step: int = 0) -> dict[str, object]:
    return {
        "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2)}}},
        "trainer": {"step": step, "best_metric": float("nan")},
    }


def run_python(code: str) -> subprocess.CompletedProcess[bytes]:
    """``code`` in a process of its own (one that may crash or be killed), importing this steadyfit."""
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC_DIR)}, capture_output=True
    )


def save_steps(store: CheckpointStore, *steps: int) -> list[Path]:
    return [store.save(step, model_state(step), components(step)) for step in steps]


def rewrite_manifest(path: Path, edit) -> None:
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def relist(path: Path, name: str) -> None:
    """Update the manifest entry of ``name`` to match its current bytes, as a careful attacker would."""
    import xxhash

    data = (path / name).read_bytes()

    def edit(manifest: dict) -> None:
        manifest["files"][name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}

    rewrite_manifest(path, edit)


def test_save_load_round_trip_with_extra_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    path = store.save(100, model_state(2.0), components(100), extra_files={"config.yaml": b"lr: 0.1\n"})
    assert path == tmp_path / "run" / "checkpoints" / "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml", "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "trainer.json",
    ]  # fmt: skip
    assert store.verify(path) == []
    model, loaded, extra = store.load(path)
    assert torch.equal(model["layer.weight"], model_state(2.0)["layer.weight"])
    assert model["layer.bias"].dtype == torch.bfloat16
    assert list(loaded["optimizer"]["state"]) == [0]
    assert loaded["trainer"]["step"] == 100
    assert extra == {"config.yaml": b"lr: 0.1\n"}
    # The weights are a plain safetensors file any tool can read.
    assert torch.equal(load_file(path / "model.safetensors")["layer.weight"], model["layer.weight"])


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    import xxhash

    path = CheckpointStore(tmp_path).save(7, model_state(), components(7))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["format_version"] == 1
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


def test_a_save_never_reads_back_what_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read_back(*args: object, **kwargs: object) -> None:
        raise AssertionError("a save read back a file it wrote")

    for name in ("hash_file", "sync_and_hash", "_hash_stream"):
        monkeypatch.setattr(steadyfit.checkpoint.atomic, name, no_read_back)
    monkeypatch.setattr(steadyfit.checkpoint.store, "sync_and_hash", no_read_back)
    store = CheckpointStore(tmp_path)
    path = store.save(3, model_state(3.0), components(3), extra_files={"config.yaml": b"a: 1\n"})
    monkeypatch.undo()
    assert store.verify(path) == []
    assert torch.equal(store.load(path)[0]["layer.weight"], model_state(3.0)["layer.weight"])


def _rehash_as_sha256(path: Path) -> None:
    """Rewrite a checkpoint's manifest the way steadyfit wrote it before XXH3 (``"sha256"`` entries)."""
    import hashlib

    def edit(manifest: dict) -> None:
        for name in manifest["files"]:
            data = (path / name).read_bytes()
            manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    rewrite_manifest(path, edit)


def test_an_old_sha256_manifest_loads_and_still_catches_a_flipped_byte(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    first, second = save_steps(store, 1, 2)
    for path in (first, second):
        _rehash_as_sha256(path)
    assert store.verify(second) == []
    model, loaded, _ = store.load(second)
    assert torch.equal(model["layer.weight"], model_state(2)["layer.weight"])
    assert loaded["trainer"]["step"] == 2
    _flip_byte(second / "optimizer.safetensors")
    good, damaged = store.latest_good()
    assert good == first
    assert damaged == [
        (second, ["sha256 mismatch for file optimizer.safetensors (content changed or corrupted)"])
    ]


@pytest.mark.parametrize(
    "entry",
    [
        {"size": 1, "sha256": "ab" * 32, "xxh3_128": "ab" * 16},
        {"size": 1, "md5": "ab" * 16},
        {"size": 1, "xxh3_128": "AB" * 16},
        {"size": 1, "xxh3_128": "ab" * 15},
    ],
    ids=["two-algorithms", "unknown-algorithm", "uppercase", "short"],
)
def test_a_manifest_entry_must_name_exactly_one_known_checksum(tmp_path: Path, entry: dict) -> None:
    (path,) = save_steps(CheckpointStore(tmp_path), 1)
    rewrite_manifest(path, lambda m: m["files"].update({"trainer.json": entry}))
    (fault,) = CheckpointStore(tmp_path).verify(path)
    assert fault.startswith(f"malformed manifest entry for 'trainer.json': {sorted(entry)}")


def test_tied_weights_are_saved_as_separate_equal_tensors(tmp_path: Path) -> None:
    shared = torch.randn(5, 2)
    store = CheckpointStore(tmp_path)
    model, _, _ = store.load(store.save(1, {"embed": shared, "head": shared, "half": shared[:2]}, {}))
    assert torch.equal(model["embed"], shared) and torch.equal(model["head"], shared)
    assert torch.equal(model["half"], shared[:2])


@pytest.mark.parametrize(
    ("damage", "fault"),
    [
        (lambda p: _flip_byte(p / "model.safetensors"), "xxh3_128 mismatch for file model.safetensors"),
        (lambda p: _truncate(p / "optimizer.safetensors"), "size mismatch for file optimizer.safetensors"),
        (lambda p: (p / "extra.bin").write_bytes(b"x"), "unexpected file extra.bin"),
        (lambda p: (p / "trainer.json").unlink(), "missing file trainer.json"),
        (lambda p: (p / "manifest.json").unlink(), "missing manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "unreadable manifest.json"),
        (lambda p: (p / "link").symlink_to(p / "trainer.json"), "symlink link"),
        (lambda p: (p / "sub").mkdir(), "unexpected non-file entry sub"),
    ],
    ids=[
        "flipped-byte",
        "truncated",
        "extra-file",
        "missing-file",
        "no-manifest",
        "bad-json",
        "symlink",
        "dir",
    ],
)
def test_verify_reports_each_kind_of_damage(tmp_path: Path, damage, fault: str) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(3, model_state(), components(3))
    damage(path)
    faults = store.verify(path)
    assert any(fault in f for f in faults), faults
    with pytest.raises(CheckpointError, match=str(path)):
        store.load(path)


def test_a_file_swapped_after_its_size_check_is_neither_read_nor_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the listing's size check and the open, the weights file becomes a much larger one: the load
    # must report it without reading it into a buffer of its new size.
    store = CheckpointStore(tmp_path)
    path = store.save(3, model_state(), components(3))
    target = path / "model.safetensors"
    large = 64 << 20
    hash_file = steadyfit.checkpoint.manifest.hash_file
    hash_stream = steadyfit.checkpoint.atomic._hash_stream
    sizes_read: list[int] = []

    def swap_then_hash(file: Path, **kwargs: object) -> object:
        if file == target:
            target.unlink()
            target.write_bytes(bytes(large))
        return hash_file(file, **kwargs)

    def recording(stream: object, algorithm: str, *, expected: int, read: object) -> object:
        sizes_read.append(expected)
        return hash_stream(stream, algorithm, expected=expected, read=read)

    monkeypatch.setattr(steadyfit.checkpoint.manifest, "hash_file", swap_then_hash)
    monkeypatch.setattr(steadyfit.checkpoint.atomic, "_hash_stream", recording)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: changed while reading"):
        store.load(path)
    assert sizes_read and large not in sizes_read


@pytest.mark.parametrize("bad_name", ["../x", "sub/x", ".hidden", "..", "/etc/passwd"])
def test_verify_rejects_names_that_are_not_plain_basenames(tmp_path: Path, bad_name: str) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(3, model_state(), components(3))
    outside = path.parent / "x"
    outside.write_bytes(b"")
    rewrite_manifest(
        path,
        lambda m: m["files"].update({bad_name: {"size": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb924"
                                                "27ae41e4649b934ca495991b7852b855"}}),
    )  # fmt: skip
    assert f"bad name in manifest: {bad_name!r}" in " ".join(store.verify(path))


def test_verify_rejects_a_manifest_for_another_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = store.save(3, model_state(), components(3))
    rewrite_manifest(path, lambda m: m.update(step=4))
    assert store.verify(path) == ["manifest step 4 does not match directory name step-00000003"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


class _TouchOnUnpickle:
    """Unpickling this calls os.mkdir(marker): the marker's existence proves that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_planted_pickle_payloads_are_never_executed(tmp_path: Path) -> None:
    probe = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists(), "the payload must be live, or this test proves nothing"

    marker = tmp_path / "payload-ran"
    store = CheckpointStore(tmp_path / "run")
    path = store.save(5, model_state(), components(5))
    # 1. The weights replaced by torch.save output, manifest updated to match: verification passes.
    torch.save({"weights": _TouchOnUnpickle(marker)}, path / "model.safetensors")
    relist(path, "model.safetensors")
    assert store.verify(path) == []
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        store.load(path)
    # 2. A component's JSON replaced by a pickle.
    (path / "trainer.json").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    relist(path, "trainer.json")
    with pytest.raises(CheckpointError):
        store.load(path)
    # 3. An extra evil.pt listed in the manifest without a role is refused ...
    (path / "evil.pt").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    relist(path, "evil.pt")
    assert "manifest lists evil.pt but no component or extra file uses it" in store.verify(path)
    # ... and listed as an extra file it is handed back as bytes, never unpickled.
    evil = (path / "evil.pt").read_bytes()
    clean = store.save(6, model_state(), components(6), extra_files={"evil.pt": evil})
    _, _, extra = store.load(clean)
    assert extra["evil.pt"] == evil
    assert not marker.exists()


def test_latest_good_skips_and_reports_a_damaged_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    first, second, third = save_steps(store, 1, 2, 3)
    _flip_byte(third / "model.safetensors")
    (second / "trainer.json").unlink()
    good, damaged = store.latest_good()
    assert good == first
    assert [p for p, _ in damaged] == [third, second]
    assert damaged[0][1] == ["xxh3_128 mismatch for file model.safetensors (content changed or corrupted)"]


def test_list_ignores_foreign_names_symlinks_and_temporaries(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    (real,) = save_steps(store, 20)
    outside = tmp_path / "elsewhere" / "step-00000099"
    outside.mkdir(parents=True)
    (store.checkpoints_dir / "step-00000099").symlink_to(outside)
    for name in ("best", "step-1", "step-00000030.bak", ".tmp-step-00000040-0123abcd"):
        (store.checkpoints_dir / name).mkdir()
    (store.checkpoints_dir / "step-00000050").write_bytes(b"a file, not a dir")
    assert store.list_checkpoints() == [real]
    link = store.checkpoints_dir / "step-00000099"
    assert store.verify(link) == [f"{link} is a symlink (checkpoints are never followed through links)"]


def test_rotate_keeps_newest_protected_and_damaged_and_foreign(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    paths = save_steps(store, 1, 2, 3, 4, 5, 6)
    _flip_byte(paths[2] / "trainer.json")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    (store.checkpoints_dir / "step-00000000").symlink_to(target)
    (store.checkpoints_dir / "mine").mkdir()

    deleted = store.rotate(keep_last=2, protect=[paths[1]])

    assert deleted == [paths[0], paths[3]]
    assert store.list_checkpoints() == [paths[1], paths[2], paths[4], paths[5]]
    assert (target / "precious").read_text() == "keep"
    assert (store.checkpoints_dir / "step-00000000").is_symlink()
    assert (store.checkpoints_dir / "mine").is_dir()


def test_rotate_never_deletes_the_newest_good_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    paths = save_steps(store, 1, 2, 3, 4)
    for damaged in paths[2:]:
        _flip_byte(damaged / "model.safetensors")
    assert store.rotate(keep_last=1) == [paths[0]]
    assert store.list_checkpoints() == paths[1:]
    assert store.latest_good()[0] == paths[1]


def test_saving_an_existing_step_replaces_it_atomically(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(5, model_state(1.0), components(5))
    path = store.save(5, model_state(9.0), components(5))
    assert torch.equal(store.load(path)[0]["layer.weight"], model_state(9.0)["layer.weight"])
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == ["step-00000005"]


def test_saving_over_a_damaged_step_keeps_the_damaged_one_aside(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    (old,) = save_steps(store, 5)
    _flip_byte(old / "model.safetensors")
    path = store.save(5, model_state(9.0), components(5))
    assert store.verify(path) == []
    kept = [p for p in store.checkpoints_dir.iterdir() if p.name.startswith("damaged-step-00000005-")]
    assert len(kept) == 1 and store.verify(kept[0]) != []
    store.cleanup_stray()
    store.rotate(keep_last=1)
    assert kept[0].is_dir()


def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for kwargs in (
        {"components": {"model": {}}},
        {"components": {"../up": {}}},
        {"components": {}, "extra_files": {"manifest.json": b"{}"}},
        {"components": {"opt": {}}, "extra_files": {"opt.json": b"{}"}},
        {"components": {}, "extra_files": {"../x": b""}},
        {"components": {"opt": {"fn": print}}},
    ):
        with pytest.raises(CheckpointError):
            store.save(1, model_state(), kwargs["components"], extra_files=kwargs.get("extra_files"))
    assert not store.checkpoints_dir.exists() or list(store.checkpoints_dir.iterdir()) == []


def test_a_crash_mid_save_leaves_no_checkpoint_and_a_stray_that_cleanup_removes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    (earlier,) = save_steps(store, 1)
    crash = (
        "import os, torch\n"
        "import steadyfit.checkpoint.store as s\n"
        "s.commit_dir = lambda tmp, final: os._exit(9)\n"
        f"s.CheckpointStore({str(tmp_path)!r}).save(2, {{'w': torch.ones(3)}}, {{'t': {{'a': 1}}}})\n"
    )
    result = run_python(crash)
    assert result.returncode == 9, result.stderr.decode()
    strays = [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".tmp-step-00000002-")]
    assert len(strays) == 1 and (strays[0] / "manifest.json").exists()
    assert store.list_checkpoints() == [earlier]
    assert store.latest_good() == (earlier, [])

    foreign = store.checkpoints_dir / ".tmp-mine"
    foreign.mkdir()
    assert store.cleanup_stray() == strays
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == [".tmp-mine", "step-00000001"]


def test_a_crash_mid_rotation_leaves_no_torn_checkpoint_and_a_stray_that_cleanup_removes(
    tmp_path: Path,
) -> None:
    # A SIGKILL while rotation deletes an old checkpoint's files must not leave a step- directory missing
    # some of them: that would read as damage, be kept forever and be warned about at every save.
    store = CheckpointStore(tmp_path)
    paths = save_steps(store, 1, 2, 3)
    crash = (
        "import os, signal\n"
        "import steadyfit.checkpoint.store as s\n"
        "def die_after_one_file(path):\n"
        "    os.unlink(min(p for p in path.iterdir() if p.is_file()))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.remove_tree = die_after_one_file\n"
        f"s.CheckpointStore({str(tmp_path)!r}).rotate(keep_last=2)\n"
    )
    result = run_python(crash)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert store.list_checkpoints() == paths[1:]
    assert all(not store.verify(path) for path in store.list_checkpoints())
    strays = [p for p in store.checkpoints_dir.iterdir() if p.name.startswith(".deleting-step-00000001-")]
    assert len(strays) == 1
    assert store.cleanup_stray() == strays
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == ["step-00000002", "step-00000003"]


def test_cleanup_restores_a_checkpoint_moved_aside_by_an_interrupted_replacement(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    five, six = save_steps(store, 5, 6)
    aside_five = store.checkpoints_dir / ".old-step-00000005-0123abcd"
    five.rename(aside_five)
    aside_six = store.checkpoints_dir / ".old-step-00000006-0123abcd"
    (aside_six / "stale").mkdir(parents=True)
    assert store.cleanup_stray() == [aside_six]
    assert store.list_checkpoints() == [five, six]
    assert store.verify(five) == [] and not aside_five.exists()


def test_save_into_a_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    (earlier,) = save_steps(store, 1)
    store.checkpoints_dir.chmod(0o500)
    try:
        if os.access(store.checkpoints_dir, os.W_OK):
            pytest.skip("running as root (with CAP_DAC_OVERRIDE): permissions are not enforced")
        with pytest.raises(CheckpointError, match=r"step-00000002.*EACCES"):
            store.save(2, model_state(), components(2))
    finally:
        store.checkpoints_dir.chmod(0o700)
    assert store.list_checkpoints() == [earlier] and store.verify(earlier) == []


@pytest.mark.parametrize(
    ("function", "code"), [("fsync", errno.ENOSPC), ("rename", errno.EIO), ("write", errno.ENOSPC)]
)
def test_disk_errors_leave_earlier_checkpoints_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, code: int
) -> None:
    store = CheckpointStore(tmp_path)
    (earlier,) = save_steps(store, 1)

    def failing(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    # Running as root, permissions cannot make the disk fail; the OS call itself is made to fail.
    monkeypatch.setattr(os, function, failing)
    with pytest.raises(CheckpointError, match=rf"{store.path_for(2)}.*{errno.errorcode[code]}") as info:
        store.save(2, model_state(), components(2), extra_files={"config.yaml": b"x"})
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == ["step-00000001"]
    assert store.verify(earlier) == []


def test_a_failed_replacement_puts_the_previous_checkpoint_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    (old,) = save_steps(store, 5)

    def failing_commit(tmp: Path, final: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(steadyfit.checkpoint.store, "commit_dir", failing_commit)
    with pytest.raises(CheckpointError, match="EIO"):
        store.save(5, model_state(9.0), components(5))
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == ["step-00000005"]
    assert torch.equal(store.load(old)[0]["layer.weight"], model_state(5)["layer.weight"])


def recording_verify(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every checkpoint any CheckpointStore verifies from now on (verification reads a checkpoint in full)."""
    verified: list[str] = []
    verify = CheckpointStore.verify

    def record(store: CheckpointStore, path: str | os.PathLike[str]) -> list[str]:
        verified.append(Path(path).name)
        return verify(store, path)

    monkeypatch.setattr(CheckpointStore, "verify", record)
    return verified


def test_rotate_after_a_commit_reads_only_what_it_deletes(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path)
    paths = save_steps(store, 1, 2, 3)
    verified = recording_verify(monkeypatch)
    assert store.rotate(keep_last=2, known_good=paths[2]) == [paths[0]]
    assert verified == [paths[0].name], "the just-committed checkpoint is not read again"


def test_rotate_with_a_known_good_checkpoint_still_checks_newer_ones(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    paths = save_steps(store, 1, 2, 3)
    _flip_byte(paths[2] / "model.safetensors")
    # The damaged newest is verified and kept; the known good one is the newest good, so it is kept too.
    assert store.rotate(keep_last=1, known_good=paths[1]) == [paths[0]]
    assert store.list_checkpoints() == paths[1:]


def fit_saving_every_step(tmp_path: Path) -> FitResult:
    config = base_config(tmp_path, save_every=1, max_steps=4, batch_size=8, keep_last=2)
    return Trainer(make_mlp(), config, train_data=make_regression(), loss_fn=F.cross_entropy).fit()


def test_a_run_never_rereads_the_checkpoint_it_just_committed(tmp_path: Path, monkeypatch) -> None:
    verified = recording_verify(monkeypatch)
    assert fit_saving_every_step(tmp_path).global_step == 4
    # Rotation after each commit reads only the checkpoint it is about to delete.
    assert verified == ["step-00000001", "step-00000002"]
    assert [p.name for p in CheckpointStore(tmp_path / "run").list_checkpoints()] == [
        "step-00000003",
        "step-00000004",
    ]


def test_a_failing_rotation_is_a_warning_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    def refuse(store: CheckpointStore, *args: object, **kwargs: object) -> list[Path]:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(CheckpointStore, "rotate", refuse)
    assert fit_saving_every_step(tmp_path).global_step == 4
    names = [p.name for p in CheckpointStore(tmp_path / "run").list_checkpoints()]
    assert names == ["step-00000001", "step-00000002", "step-00000003", "step-00000004"]
    warning = (
        "steadyfit: warning: checkpoint {} is committed, but rotating older checkpoints (keep_last=2) failed"
    )
    stderr = capsys.readouterr().err
    for name in names:
        assert warning.format(tmp_path / "run" / "checkpoints" / name) in stderr


def test_weights_written_by_plain_safetensors_load_without_a_copy_of_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    store = CheckpointStore(tmp_path)
    path = store.save(1, model_state(), components(1))
    weights = {"a": torch.randn(3, 4), "b": torch.tensor(2.0), "c": torch.zeros(0, 2), "d": torch.ones(2) > 0}
    (path / "model.safetensors").unlink()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    relist(path, "model.safetensors")
    model, _, _ = store.load(path)
    assert model.keys() == weights.keys()
    assert all(torch.equal(model[k], weights[k]) and model[k].dtype == weights[k].dtype for k in weights)


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01", "shorter than its header length"),
        ((10**6).to_bytes(8, "little") + b"{}", "header length 1000000 exceeds the file"),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "byte range",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "bad header",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            "start",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            "after",
        ),
    ],
    ids=["short", "header-overruns", "size-vs-shape", "unknown-dtype", "gap", "trailing-bytes"],
)
def test_malformed_safetensors_behind_a_matching_manifest_is_refused(
    tmp_path: Path, data: bytes, why: str
) -> None:
    store = CheckpointStore(tmp_path)
    (path,) = save_steps(store, 1)
    (path / "model.safetensors").write_bytes(data)
    relist(path, "model.safetensors")
    assert store.verify(path) == []
    with pytest.raises(CheckpointError, match=f"model.safetensors is not a valid safetensors file: .*{why}"):
        store.load(path)


def test_loaded_tensors_each_own_an_allocation_as_from_torch_load(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    rng_state = torch.get_rng_state()
    path = store.save(1, model_state(), {"trainer": {"rng": rng_state, "half": torch.ones(3).half()}})
    model, loaded, _ = store.load(path)
    for tensor in [*model.values(), *loaded["trainer"].values()]:
        # As torch.load gives them: offset 0 into a storage of exactly the tensor's size (set_rng_state and
        # other C++ consumers read the storage, not the view).
        assert tensor.storage_offset() == 0
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    torch.set_rng_state(loaded["trainer"]["rng"])
    assert torch.equal(torch.get_rng_state(), rng_state)
    # Each its own allocation, as from torch.load (freed on its own), not carved out of one file buffer
    # where one tensor's bytes end where the next one's begin.
    spans = sorted((t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in model.values())
    assert all(end != next_start for (_, end), (next_start, _) in itertools.pairwise(spans))


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("where", ["header-length", "header", "body"])
def test_damage_to_a_tensor_file_is_named_as_damage_wherever_it_lands(
    tmp_path: Path, file: str, where: str
) -> None:
    # A load reads a tensor file's header before the file is verified (it says where the tensors go): a
    # damaged header must still be reported as damage, by its checksum, never as a malformed file, and
    # must not size an allocation.
    store = CheckpointStore(tmp_path)
    path = store.save(1, model_state(), components(1))
    target = path / file
    data = bytearray(target.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[{"header-length": 7, "header": 8 + header_len // 2, "body": len(data) - 1}[where]] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"xxh3_128 mismatch for file {file} \(content changed"):
        store.load(path)


def test_large_files_are_hashed_beside_the_io_in_a_thread_that_never_outlives_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed_in: list[str] = []
    run = steadyfit.checkpoint.atomic.HashThread._run

    def recording_run(self: steadyfit.checkpoint.atomic.HashThread) -> None:
        hashed_in.append(threading.current_thread().name)
        run(self)

    monkeypatch.setattr(steadyfit.checkpoint.atomic.HashThread, "_run", recording_run)
    before = set(threading.enumerate())
    store = CheckpointStore(tmp_path)
    weights = {"w": torch.randn(1024, 1024)}  # 4 MiB: past the threshold for a hashing thread
    path = store.save(1, weights, {})
    assert set(threading.enumerate()) == before
    assert torch.equal(store.load(path)[0]["w"], weights["w"])
    assert store.verify(path) == []
    assert set(threading.enumerate()) == before
    # One thread for the save, one for the load, one for the verification: each joined before returning.
    assert hashed_in == ["steadyfit-hash"] * 3


def test_every_safetensors_dtype_round_trips_and_others_are_refused_before_writing(tmp_path: Path) -> None:
    from steadyfit.checkpoint import AsyncCheckpointWriter
    from steadyfit.checkpoint.payload import SAFETENSORS_DTYPES

    store = CheckpointStore(tmp_path / "run")
    weights = {f"t.{name}": torch.ones(3, 2).to(dtype) for name, dtype in SAFETENSORS_DTYPES.items()}
    model, _, _ = store.load(store.save(1, weights, components(1)))
    for name, tensor in weights.items():
        assert model[name].dtype == tensor.dtype and torch.equal(
            model[name].view(torch.uint8), tensor.view(torch.uint8)
        )
    # complex128 has no safetensors name: refused in the caller's thread, naming it, with nothing written.
    bad = {"w": torch.ones(2, dtype=torch.complex128)}
    with pytest.raises(CheckpointError, match=r"cannot store .*w.*complex128"):
        store.save(2, bad, components(2))
    with AsyncCheckpointWriter(store) as writer, pytest.raises(CheckpointError, match="complex128"):
        writer.submit(3, bad, components(3))
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == ["step-00000001"]


def test_a_header_of_the_wrong_types_is_a_checkpoint_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    path = store.save(1, model_state(), components(1))
    header = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    relist(path, "model.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors file: bad header entry for 'w'"):
        store.load(path)


def test_a_manifest_entry_with_a_key_of_another_version_is_named(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    path = store.save(1, model_state(), components(1))

    def add_key(manifest: dict) -> None:
        manifest["files"]["trainer.json"]["blake3"] = "ab" * 32

    rewrite_manifest(path, add_key)
    faults = store.verify(path)
    assert len(faults) == 1 and "malformed manifest entry for 'trainer.json'" in faults[0]
    assert "blake3" in faults[0] and "xxh3_128" in faults[0]
