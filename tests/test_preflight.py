import subprocess
import sys

import pytest
from conftest import ROOT

from vidrep.common.preflight import PreflightError, compose, did_you_mean, first_values, preflight
from vidrep.eval.checks import check_evaluate
from vidrep.mining.checks import check_mine
from vidrep.training.checks import check_train


def errors(config, check, *overrides):
    with pytest.raises(SystemExit) as e:
        preflight(config, check, list(overrides))
    assert e.value.code == 2


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("trainer.max_step=5", "trainer.max_steps"),
        ("model.loss.marjin=1", "model.loss.margin"),
        ("dat.root=/x", "data.root"),
    ],
)
def test_an_unknown_key_gets_the_nearest_valid_one(override, suggestion):
    with pytest.raises(PreflightError, match=f"unknown key {override.split('=')[0]}: did you mean {suggestion}\\?"):
        compose("train", [override])


def test_did_you_mean_prefers_siblings():
    keys = ["trainer", "trainer.max_steps", "trainer.max_epochs", "trainer.strategy", "data", "data.max_step_x"]
    assert did_you_mean("trainer.max_step", keys)[0] == "trainer.max_steps"
    assert did_you_mean("trainer.zzz", keys) == []


def test_sweeps_are_checked_with_their_first_value():
    overrides, swept = first_values(["data=1.5M,5M", "seed=range(0,3)", "trainer.devices=1"])
    assert overrides == ["data=1.5M", "seed=0", "trainer.devices=1"] and swept == {"data", "seed"}


def test_paths_and_missing_values_are_named(tmp_path, capsys):
    errors("train", check_train, "data=corpus", f"data.root={tmp_path / 'nope'}")
    assert f"data.root={tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    errors("train", check_train, "data=8M")
    assert "needs a mined corpus: add data.root=" in capsys.readouterr().err
    errors("train", check_train, f"ckpt_path={tmp_path / 'last.ckpt'}")
    assert "ckpt_path=" in capsys.readouterr().err
    errors("evaluate", check_evaluate)
    err = capsys.readouterr().err
    assert "ckpt is not set" in err and "ckpt=random" in err and "imagenet:" in err
    errors("evaluate", check_evaluate, "ckpt=random")
    assert "voc.root is not set" in capsys.readouterr().err
    errors("evaluate", check_evaluate, f"ckpt=[random,{tmp_path / 'a.ckpt'}]", f"voc.root={tmp_path}")
    assert "a.ckpt' does not exist" in capsys.readouterr().err
    errors("mine", check_mine, f"videos={tmp_path / 'v'}", f"out={tmp_path / 'c'}")
    assert "videos=" in capsys.readouterr().err
    # a valid command passes, and a swept path is left to each job
    preflight("evaluate", check_evaluate, ["ckpt=random", f"voc.root={tmp_path}"])
    preflight("train", check_train, ["-m", "data=corpus", f"data.root={tmp_path / 'a'},{tmp_path / 'b'}"])


def test_train_py_stops_before_any_run_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.max_step=5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2 and "did you mean trainer.max_steps?" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "outputs").exists()


def test_every_protocol_preset_composes_on_its_own_so_a_sweep_over_them_does(tmp_path):
    import hydra

    presets = sorted(p.stem for p in (ROOT / "vidrep" / "conf" / "protocol").glob("*.yaml"))
    assert {"svm", "svm_cpu", "detection", "detection_cpu", "retrieval"} <= set(presets)
    for name in presets:
        cfg = compose(
            "evaluate",
            [f"protocol={name}", "ckpt=random", f"voc.root={tmp_path}", f"retrieval.corpus={tmp_path}"]
            if name == "retrieval"
            else [f"protocol={name}", "ckpt=random", f"voc.root={tmp_path}"],
        )
        if name != "retrieval":
            assert hydra.utils.instantiate(cfg.protocol).settings()["name"] in ("svm", "detection")
    cpu = compose("evaluate", ["protocol=detection_cpu", "ckpt=random", f"voc.root={tmp_path}"]).protocol
    full = compose("evaluate", ["protocol=detection", "ckpt=random", f"voc.root={tmp_path}"]).protocol
    assert cpu.iterations < full.iterations and cpu.svm.C == full.svm.C and cpu.regions == full.regions


def test_a_corpus_smaller_than_a_batch_is_refused_before_anything_starts(tmp_path, capsys):
    import json

    (tmp_path / "summary.json").write_text(json.dumps({"pairs": 9}))
    errors("train", check_train, "data=corpus", f"data.root={tmp_path}")
    err = capsys.readouterr().err
    assert "holds 9 pairs" in err and "lower data.batch_size" in err
    preflight("train", check_train, ["data=corpus", f"data.root={tmp_path}", "data.batch_size=4"])


def _run(script, *overrides, cwd, env=None):
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_a_mining_settings_mismatch_is_one_line_without_a_traceback(tmp_path):
    """The corpus was mined with other settings: refused in one line naming the way out, exit 1."""
    import json

    videos, corpus = tmp_path / "videos", tmp_path / "corpus"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not decoded: the settings are checked first")
    corpus.mkdir()
    (corpus / "mining.json").write_text(json.dumps({"detector": "gftt", "min_track": 999}))
    out = _run("mine.py", f"videos={videos}", f"out={corpus}", "workers=0", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mined with other settings" in errors[0] and "new out= folder" in errors[0]
    # the traceback is one variable away
    full = _run(
        "mine.py", f"videos={videos}", f"out={corpus}", "workers=0", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "CorpusError" in full.stderr


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    """A dry run that cannot plan (no corpus and no data size) fails after Hydra made the run
    directory: one line, and the directory is gone."""
    run_dir = tmp_path / "run"
    out = _run("train.py", "data=corpus", "dry_run=true", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: dry_run=true without a corpus plans from")
    assert not run_dir.exists()


def test_error_lines_and_what_is_removed(tmp_path):
    from vidrep.common.preflight import error_line, remove_if_only_hydras

    assert error_line(ValueError("settings that cannot train:\n  a\n  b")) == "settings that cannot train: a b"
    assert error_line(KeyError("x")).startswith("KeyError: 'x' (HYDRA_FULL_ERROR=1 shows where")
    (tmp_path / "bare" / ".hydra").mkdir(parents=True)
    (tmp_path / "bare" / "train.log").write_text("")
    assert remove_if_only_hydras(tmp_path / "bare", "train") and not (tmp_path / "bare").exists()
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    assert not remove_if_only_hydras(tmp_path / "used", "train") and (tmp_path / "used" / "checkpoints").exists()
