"""A checkpoint is accepted whole or refused, never runs code, never holds non-finite weights; one
run per run directory; settings that are not finite never start (issue 25, items 3, 4, 5, 8, 9)."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY

from vidrep.training.checkpoints import (
    FORMAT_KEY,
    HASH_KEY,
    TENSOR_HASH_KEY,
    DamagedCheckpointError,
    HashedCheckpointIO,
    UnsafeCheckpointError,
    _tensor_hashes_v1,
    load_verified,
)


def _state(lr: float = 0.002) -> dict:
    return {
        "epoch": 1,
        "global_step": 7,
        "state_dict": {"net.trunk.w": torch.full((64,), 1.2345), "net.trunk.b": torch.zeros(3)},
        "optimizer_states": [
            {"state": {0: {"momentum_buffer": torch.ones(4)}}, "param_groups": [{"lr": lr, "momentum": 0.9}]}
        ],
        "lr_schedulers": [{"milestones": {10: 1}, "base_lrs": [lr]}],
        "hyper_parameters": {"loss": {"margin": 0.5}, "pixel_mean": [104.0, 117.0, 123.0]},
        "PairDataModule": {"train_position": {"epoch": 1, "batches": 3, "seed": 0}},
    }


def _altered_lr(folder: Path) -> Path:
    """A checkpoint written by this version, then its lr changed 0.002 -> 0.2 inside the file (the
    pickle rewritten around the same hashes, as an editor of data.pkl would)."""
    path = folder / "checkpoints" / "last.ckpt"
    HashedCheckpointIO().save_checkpoint(_state(), path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["optimizer_states"][0]["param_groups"][0]["lr"] = 0.2
    torch.save(ckpt, path)
    return path


class _RunsACommand:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _runs_a_command(path: Path, marker: Path) -> Path:
    evil = _RunsACommand()
    evil.marker = str(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**_state(), "x": evil}, path)
    return path


def _cli(script: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )


# ---------------------------------------------------------------- accepted whole or refused


def test_every_value_is_hashed_and_one_plain_value_changed_is_refused(tmp_path):
    path = _altered_lr(tmp_path)
    with pytest.raises(DamagedCheckpointError, match=r"last.ckpt is damaged .*param_groups\.0\.lr"):
        load_verified(path)
    io = HashedCheckpointIO()
    for key, change in (
        ("epoch", lambda c: c.update(epoch=5)),
        ("lr_schedulers.0.milestones.10", lambda c: c["lr_schedulers"][0]["milestones"].update({10: 3})),
        ("PairDataModule.train_position.batches", lambda c: c["PairDataModule"]["train_position"].update(batches=0)),
        ("hyper_parameters.loss.margin", lambda c: c["hyper_parameters"]["loss"].update(margin=5.0)),
        ("hyper_parameters.extra", lambda c: c["hyper_parameters"].update(extra=1)),  # an added key
    ):
        good = tmp_path / f"{key}.ckpt"
        io.save_checkpoint(_state(), good)
        assert load_verified(good)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.002
        ckpt = torch.load(good, weights_only=True)
        change(ckpt)
        torch.save(ckpt, good)
        with pytest.raises(DamagedCheckpointError, match=key.replace(".", r"\.")):
            load_verified(good)


def test_a_checkpoint_of_this_version_without_its_hash_is_damaged_an_old_one_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "new.ckpt"
    HashedCheckpointIO().save_checkpoint(_state(), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt[FORMAT_KEY] == 2
    ckpt["renamed_hashes"] = ckpt.pop(HASH_KEY)  # the hash key renamed: not an "old checkpoint"
    torch.save(ckpt, path)
    with pytest.raises(DamagedCheckpointError, match="new.ckpt is damaged"):
        load_verified(path)
    ckpt.pop(FORMAT_KEY)
    ckpt["vidrep_hashes"] = ckpt.pop("renamed_hashes")  # both renamed, one still says vidrep
    torch.save(ckpt, path)
    with pytest.raises(DamagedCheckpointError, match="new.ckpt is damaged"):
        load_verified(path)

    before = tmp_path / "before_hashing.ckpt"
    torch.save(_state(), before)
    with caplog.at_level("WARNING"):
        assert load_verified(before)["global_step"] == 7
    assert "written before vidrep hashed its checkpoints" in caplog.text
    format1 = tmp_path / "format1.ckpt"
    state = _state()
    state[TENSOR_HASH_KEY] = _tensor_hashes_v1(state)
    torch.save(state, format1)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_verified(format1)["global_step"] == 7
    assert "before vidrep hashed whole checkpoints" in caplog.text
    state["state_dict"]["net.trunk.b"][0] = 1.0  # format 1 still catches its tensors' damage
    torch.save(state, format1)
    with pytest.raises(DamagedCheckpointError, match=r"state_dict\.net\.trunk\.b"):
        load_verified(format1)


def _train_and_evaluate_refuse(tmp_path, corpus, run: Path, path: Path, error: type, message: str, capsys) -> None:
    """train() (as ckpt_path= and as resume=) raises `error`, and evaluate.py's checks exit 2 with
    `message`: in this process, as the entry points call them (one subprocess CLI per entry point is
    tested in test_train.py / test_run_feedback.py)."""
    from test_train import tiny_cfg

    from vidrep.common.preflight import preflight
    from vidrep.eval.checks import check_evaluate
    from vidrep.training.run import train

    for how in (f"ckpt_path={path}", f"resume={run}"):
        with pytest.raises(error, match=message):
            train(tiny_cfg(tmp_path / "new", corpus, "trainer.max_epochs=1", how))
    voc = tmp_path / "voc"
    voc.mkdir()
    with pytest.raises(SystemExit) as exit:
        preflight("evaluate", check_evaluate, argv=[f"ckpt={path}", f"voc.root={voc}", "wandb.enabled=false"])
    assert exit.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_train_and_evaluate_refuse_a_checkpoint_with_its_lr_changed(tmp_path, tiny_corpus, capsys):
    run = tmp_path / "old_run"
    path = _altered_lr(run)
    _train_and_evaluate_refuse(
        tmp_path, tiny_corpus, run, path, DamagedCheckpointError, r"is damaged .*param_groups\.0\.lr", capsys
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"], "nothing moved or written"
    assert not (run / "metrics.csv").exists()


# ---------------------------------------------------------------- no file runs code


def test_a_checkpoint_whose_pickle_runs_a_command_is_refused_without_running_it(tmp_path, tiny_corpus, capsys):
    marker = tmp_path / "the_command_ran"
    run = tmp_path / "old_run"
    path = _runs_a_command(run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"last.ckpt needs more than tensors .*posix\.system"):
        load_verified(path)
    _train_and_evaluate_refuse(
        tmp_path, tiny_corpus, run, path, UnsafeCheckpointError, "needs more than tensors and plain values", capsys
    )
    assert not marker.exists(), "the pickle's command ran"


def test_a_checkpoint_written_by_training_loads_with_weights_only(tmp_path, tiny_corpus):
    """What Lightning and vidrep put in a checkpoint (hyper_parameters, loops, callback and data
    module states) is plain values and tensors: the weights_only load takes it, hash intact."""
    from test_train import tiny_cfg

    from vidrep.training.run import train

    cfg = tiny_cfg(tmp_path, tiny_corpus, "trainer.max_epochs=1", "+trainer.limit_train_batches=2")
    train(cfg)
    ckpt = load_verified(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt[FORMAT_KEY] == 2 and ckpt["global_step"] == 2 and "hyper_parameters" in ckpt


# ---------------------------------------------------------------- non-finite


def test_no_checkpoint_is_written_with_non_finite_weights_and_the_stop_names_the_last_finite_one(tmp_path):
    from vidrep.training.run import last_finite_checkpoint

    io = HashedCheckpointIO()
    ckpts = tmp_path / "checkpoints"
    assert "no checkpoint holds finite weights" in last_finite_checkpoint(ckpts)
    io.save_checkpoint({**_state(), "global_step": 20}, ckpts / "step0000020.ckpt")
    for name, step in (("step0000040.ckpt", 40), ("last.ckpt", 41)):  # e.g. ModelCheckpoint's and LastCheckpoint's
        diverged = _state()
        diverged["global_step"] = step
        diverged["state_dict"]["net.trunk.w"][3] = float("nan")
        io.save_checkpoint(diverged, ckpts / name)
    momentum = {**_state(), "global_step": 50}
    momentum["optimizer_states"][0]["state"][0]["momentum_buffer"][0] = float("inf")
    io.save_checkpoint(momentum, ckpts / "step0000050.ckpt")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0000020.ckpt"]
    message = last_finite_checkpoint(ckpts)
    assert "step0000020.ckpt (step 20)" in message and "ckpt_path=" in message


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.loss.margin=nan", "model.loss.margin"),
        ("model.loss.margin=inf", "model.loss.margin"),
        ("model.optimizer.lr=nan", "model.optimizer.lr"),
        ("model.optimizer.weight_decay=inf", "model.optimizer.weight_decay"),
        ("model.loss.hard_ratio=nan", "model.loss.hard_ratio"),
        ("data.val_fraction=nan", "data.val_fraction"),
    ],
)
def test_nan_and_inf_settings_are_refused_naming_the_key(tmp_path, override, key):
    from test_configs import compose_train

    from vidrep.training.validate import settings_errors

    errors = settings_errors(compose_train([override, f"data.root={tmp_path}"], tmp_path))
    assert any(e.startswith(f"{key}=") for e in errors), errors


def test_train_cli_exits_2_on_a_nan_setting(tmp_path):
    out = _cli("train.py", ["model.loss.margin=nan", f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=120)
    assert out.returncode == 2 and "model.loss.margin=nan" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- one run per run directory

_HOLD = """
import sys, time
from vidrep.training.lock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_a_held_run_dir_stops_naming_the_holder_and_a_killed_holder_leaves_it_free(
    tmp_path, tiny_corpus
):
    import socket

    from vidrep.training.lock import RunDirLockedError, hold_run_dir

    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunDirLockedError, match=rf"in use by another run \(pid {holder.pid} on host "):
            with hold_run_dir(run):
                pass
        args = [*TINY, f"data.root={tiny_corpus}", "~data.demo", "logger=csv", "trainer.max_epochs=1"]
        out = _cli("train.py", [*args, f"hydra.run.dir={run}"], tmp_path)
        assert out.returncode != 0 and f"pid {holder.pid} on host {socket.gethostname()}" in out.stderr, out.stderr
        assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_run_dir(run) as lock:  # kill -9 left no stuck lock: taken over at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):  # and it holds in this process too
            with hold_run_dir(run):
                pass


# ---------------------------------------------------------------- smaller (item 8)


def test_disk_full_during_a_checkpoint_save_gets_the_atomic_writers_message(tmp_path, monkeypatch):
    import vidrep.common.io as vio

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    path = tmp_path / "checkpoints" / "last.ckpt"
    HashedCheckpointIO().save_checkpoint(_state(), path)
    before = path.read_bytes()
    monkeypatch.setattr(vio, "open", lambda p, mode: FullDisk(real_open(p, mode)), raising=False)
    big = {**_state(), "global_step": 9}
    big["state_dict"]["net.trunk.w"] = torch.ones(1 << 16)
    with pytest.raises(OSError, match=r"cannot write .*last.ckpt \(torch.save failed .*MiB free.*previous file there"):
        HashedCheckpointIO().save_checkpoint(big, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_directory_given_as_a_checkpoint_says_so(tmp_path):
    from vidrep.common.preflight import PreflightError, compose
    from vidrep.eval.checks import check_evaluate
    from vidrep.eval.features import CheckpointError, read_checkpoint
    from vidrep.training.checks import check_train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"is a directory.*ckpt=.*/checkpoints/last.ckpt"):
        read_checkpoint(run)
    with pytest.raises(IsADirectoryError, match=r"is a directory.*resume="):
        load_verified(run)
    voc = tmp_path / "voc"
    voc.mkdir()
    with pytest.raises(PreflightError, match=r"is a directory.*checkpoints/last.ckpt"):
        check_evaluate(compose("evaluate", [f"ckpt={run}", f"voc.root={voc}"]), set())
    with pytest.raises(PreflightError, match=rf"ckpt_path={run} is a directory.*resume={run}"):
        check_train(compose("train", [f"ckpt_path={run}"]), set())


def test_the_settings_check_counts_a_ranks_own_batch_under_linear_scaling(tmp_path):
    from test_configs import compose_train

    from vidrep.training.validate import settings_errors

    common = [f"data.root={tmp_path}", "data.batch_size=8", "trainer.devices=4", "model.loss.gather_across_ranks=false"]
    # paper: 8 pairs dealt over 4 ranks, 2 each: at most 2 negatives per pair
    assert any("num_negatives=4" in e for e in settings_errors(compose_train([*common, "scaling=paper"], tmp_path)))
    # linear: every rank keeps its 8 pairs: 14 negatives
    assert settings_errors(compose_train([*common, "scaling=linear"], tmp_path)) == []
    assert any(
        "at most 14" in e
        for e in settings_errors(compose_train([*common, "scaling=linear", "model.loss.num_negatives=15"], tmp_path))
    )


def test_a_run_that_diverges_writes_no_non_finite_checkpoint_and_names_the_last_finite_one(tmp_path, tiny_corpus):
    from test_train import tiny_cfg

    from vidrep.training.run import train

    cfg = tiny_cfg(
        tmp_path,
        tiny_corpus,
        "trainer.max_epochs=2",
        "model.optimizer.lr=1e12",  # diverges within a few steps
        "callbacks.stop_on_nan.every_n_steps=1",
        "callbacks.periodic_checkpoint.every_n_train_steps=1",
    )
    with pytest.raises(RuntimeError, match=r"not finite.*(last finite weights are in|no checkpoint holds)") as e:
        train(cfg)
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        ckpt = load_verified(path)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()), path
    named = str(e.value).split("last finite weights are in ")[-1].split(" (step")[0]
    assert "no checkpoint holds" in str(e.value) or Path(named).is_file()
