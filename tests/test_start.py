"""What a run records from step 0 (vidrep/training/start.py, vidrep/eval/monitor.py) and the
comparison of a run with its initialisation on its own held-out videos (evaluate.py protocol=retrieval
run=<run dir>), on one tiny training run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY
from test_hard_retrieval import hard_corpus, videos  # noqa: F401 (fixtures)
from test_train import read_metrics

MONITOR = "monitor/hard/recall_at_1"


@pytest.fixture(scope="module")
def tiny_run(hard_corpus, tmp_path_factory):  # noqa: F811
    from test_configs import compose_train

    from vidrep.training.run import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        [
            *TINY,
            f"data.root={hard_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer.max_steps=5",
            "callbacks.retrieval_monitor.every_n_steps=2",
            "callbacks.retrieval_monitor.num_pairs=12",
        ],
        out,
    )
    train(cfg)
    return out


@pytest.mark.slow
def test_validation_and_monitor_start_at_step_zero(tiny_run):
    rows = read_metrics(tiny_run / "metrics.csv")
    val = [int(r["step"]) for r in rows if r.get("val/triplet_acc")]
    assert val[0] == 0, val
    monitored = [int(r["step"]) for r in rows if r.get(MONITOR)]
    assert monitored == [0, 2, 4, 5]  # step 0, every 2 steps, the end
    dead = [float(r["monitor/dead_fc7"]) for r in rows if r.get("monitor/dead_fc7")]
    assert len(dead) == 4 and all(0 <= d <= 1 for d in dead)


@pytest.mark.slow
def test_step_zero_figures_are_those_of_init_ckpt(tiny_run, hard_corpus):  # noqa: F811
    """The monitor's step-0 row equals the protocol rerun on init.ckpt over the same sample."""
    from vidrep.data.corpus import PairIndex, select_pairs
    from vidrep.eval.features import load_checkpoint_trunk, read_checkpoint
    from vidrep.eval.monitor import sample_videos
    from vidrep.eval.retrieval import (
        RetrievalSettings,
        load_queries,
        network_featurizer,
        ranks_by_feature,
        retrieval_metrics,
    )

    init = tiny_run / "checkpoints" / "init.ckpt"
    read_checkpoint(init)  # hashed by the trainer's writer: verified on load
    index = PairIndex(hard_corpus)
    val = select_pairs(index.video_id, index.query_frame, None, 0.25, 0).val
    rows = val[sample_videos(index.video_id[val], 12, 0)]
    queries = load_queries(index, rows, RetrievalSettings())
    ranks = ranks_by_feature(queries, [network_featurizer([load_checkpoint_trunk(init)], ["fc7"])])["fc7"]
    expected = retrieval_metrics(ranks, queries.video, queries.num_candidates)
    row = next(r for r in read_metrics(tiny_run / "metrics.csv") if r.get(MONITOR))
    assert float(row[MONITOR]) == pytest.approx(expected["recall_at_1"])
    assert float(row["monitor/hard/median_rank"]) == pytest.approx(expected["median_rank"])
    held = json.loads((tiny_run / "held_out.json").read_text())
    assert sorted(held["video_ids"]) == sorted(set(index.video_id[val].tolist()))
    assert held["num_pairs"] == len(val) and held["corpora"] == [str(hard_corpus.resolve())]


@pytest.mark.slow
def test_evaluate_a_run_against_its_initialisation_on_its_held_out_videos(tiny_run, hard_corpus, tmp_path):  # noqa: F811
    def evaluate(*args):
        out = subprocess.run(
            [sys.executable, str(ROOT / "evaluate.py"), "protocol=retrieval", "wandb.enabled=false", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    evaluate(f"run={tiny_run}", f"hydra.run.dir={tmp_path}/run")
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    held = json.loads((tiny_run / "held_out.json").read_text())
    assert result["data"]["videos"] == held["videos"] and result["checkpoints"] == [
        str(tiny_run / "checkpoints" / "last.ckpt")
    ]
    assert result["retrieval_settings"]["candidates"] == "hard"
    names = set(result["retrieval"])
    assert {"fc7", "initialisation init.ckpt (fc7)", "colour_histogram", "pixels"} <= names
    assert {f"initialisation seed {s} (fc7)" for s in (0, 1, 2)} <= names
    init = result["initialisation"]["fc7"]
    assert init["references"][0] == "initialisation init.ckpt" and len(init["recall_at_1"]["per_seed"]) == 4
    r1 = [result["retrieval"][f"{lab} (fc7)"]["recall_at_1"] for lab in init["references"]]
    assert init["recall_at_1"]["mean"] == pytest.approx(np.mean(r1)) and init["recall_at_1"]["std"] == pytest.approx(
        np.std(r1)
    )
    versus = result["vs_initialisation"]["fc7"]
    assert versus["reference"] == "initialisation init.ckpt" and versus["p"] <= 1
    assert versus["wins"] + versus["losses"] <= result["retrieval"]["fc7"]["num_pairs"]
    # without run=, over the whole training corpus: said, and counted
    out = evaluate(
        f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}",
        f"retrieval.corpus={hard_corpus}",
        f"hydra.run.dir={tmp_path}/all",
    )
    mixed = json.loads((tmp_path / "all" / "results.json").read_text())["data"]["training_videos_included"]
    assert mixed > 0 and "training videos" in out.stderr + out.stdout
