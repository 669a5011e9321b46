"""The demo's check (vidrep/demo/check.py): the test world's probe data and demo_eval.json."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY

from vidrep.data.synthetic import SHAPES, SyntheticVideo

WORLD = {"num_objects": 3, "palette": "shared", "spin": 2.0, "breathe": 0.25, "lighting": 0.2}


def test_object_windows_centre_each_object_with_its_shape():
    from vidrep.demo.check import PROBE_FRAMES, object_windows

    params = {"seed": 40, "num_videos": 2, "num_frames": 60, "world": WORLD}
    patches, labels, seeds = object_windows(params)
    frames = sorted({min(t, 59) for t in PROBE_FRAMES})
    assert patches.shape == (2 * len(frames) * 3, 227, 227, 3) and patches.dtype == np.uint8
    assert seeds.tolist() == [s for s in (40, 41) for _ in range(len(frames) * 3)]
    row = 0
    for seed in (40, 41):
        video = SyntheticVideo(seed, num_frames=60, **WORLD)
        for t in frames:
            frame = video.frame(t)[:, :, ::-1]
            for (x, y, w, h), shape in zip(video.boxes(t), video.shapes):
                assert labels[row] == SHAPES.index(shape)
                # the object's centre pixel is in the window, where the window's own offset puts it
                left = int(np.clip(x + w // 2 - 113, 0, video.width - 227))
                top = int(np.clip(y + h // 2 - 113, 0, video.height - 227))
                np.testing.assert_array_equal(patches[row], frame[top : top + 227, left : left + 227])
                assert left <= x + w // 2 < left + 227 and top <= y + h // 2 < top + 227
                row += 1


def test_seed_mean_and_initial_trunks():
    import torch

    from vidrep.demo.check import initial_trunks, seed_mean
    from vidrep.models.caffenet import CaffeNet

    rows = [{"recall_at_1": 0.2, "num_pairs": 10}, {"recall_at_1": 0.4, "num_pairs": 10}]
    assert seed_mean(rows) == {"recall_at_1": pytest.approx(0.3), "num_pairs": 10}
    torch.manual_seed(0)
    run = CaffeNet(67, 64, 32, bias_one=False, init="kaiming")
    state = torch.random.get_rng_state()
    trunks = initial_trunks(run, (1, 2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is left alone
    assert trunks[0] is run and len(trunks) == 3
    torch.manual_seed(1)
    again = CaffeNet(67, 64, 32, bias_one=False, init="kaiming")
    assert torch.equal(trunks[1].fc7.weight, again.fc7.weight)
    assert not torch.equal(trunks[1].fc7.weight, trunks[2].fc7.weight)


@pytest.mark.slow
def test_demo_eval_json_comes_from_the_run(tiny_corpus, tmp_path, tmp_path_factory):
    """A 2-step run with the demo's check on a test world (the tiny corpus stands in for it): the
    json holds exactly the issue's keys, the baselines' figures equal the protocol's own on the same
    pairs, and the logged metrics equal the json's."""
    from test_configs import compose_train

    from vidrep.data.corpus import PairIndex
    from vidrep.eval.retrieval import RetrievalSettings, baseline_featurizer, retrieval_results
    from vidrep.training.run import train

    params = json.loads((tiny_corpus / "demo.json").read_text())
    # The check cuts distractors into its test world: a copy, so the session's corpus stays without them.
    world = tmp_path_factory.mktemp("world") / tiny_corpus.name
    shutil.copytree(tiny_corpus, world)
    shutil.copytree(tiny_corpus.with_name(f"{tiny_corpus.name}-videos"), world.with_name(f"{world.name}-videos"))
    overrides = [o for o in TINY if o != "~callbacks.demo_check"]
    cfg = compose_train(
        [
            *overrides,
            f"data.root={tiny_corpus}",
            "~data.demo",
            "logger=csv",
            "trainer.max_steps=2",
            f"callbacks.demo_check.test_world.root={world}",
            f"callbacks.demo_check.test_world.num_videos={params['num_videos']}",
            f"callbacks.demo_check.test_world.num_frames={params['num_frames']}",
            f"callbacks.demo_check.test_world.seed={params['seed']}",
            "callbacks.demo_check.test_world.world={}",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    report = json.loads((tmp_path / "demo_eval.json").read_text())
    features = ["trained", "initialisation", "colour_histogram", "pixels"]
    assert report["candidates"] == "hard"
    assert list(report["retrieval"]) == features and list(report["probe"]) == features
    for r in report["retrieval"].values():
        assert set(r) == {
            "recall_at_1",
            "recall_at_5",
            "median_rank",
            "num_pairs",
            "num_videos",
            "num_candidates_mean",
            "wins_vs_init",
            "losses_vs_init",
            "p_vs_init",
        }
    for r in report["probe"].values():
        assert set(r) == {"accuracy", "num_train", "num_test"} and r["num_train"] > 0 and r["num_test"] > 0
    assert [s["seed"] for s in report["initialisation_seeds"]] == ["run", 1, 2]
    seeds = report["initialisation_seeds"]
    assert report["retrieval"]["initialisation"]["recall_at_1"] == pytest.approx(
        np.mean([s["retrieval"]["recall_at_1"] for s in seeds])
    )
    assert seeds[0]["retrieval"]["wins_vs_init"] == seeds[0]["retrieval"]["losses_vs_init"] == 0
    index = PairIndex(world)
    expected = retrieval_results(
        index,
        np.arange(len(index)),
        [baseline_featurizer(b) for b in ("colour_histogram", "pixels")],
        settings=RetrievalSettings(),
    )
    for name, r in expected.items():
        for k, v in r.items():
            assert report["retrieval"][name][k] == pytest.approx(v), (name, k)
    for name in features:
        assert metrics[f"demo_eval/{name}/recall_at_1"] == pytest.approx(report["retrieval"][name]["recall_at_1"])
        assert metrics[f"demo_eval/{name}/probe_accuracy"] == pytest.approx(report["probe"][name]["accuracy"])
    assert "Weights moved" in (tmp_path / "demo_eval.md").read_text()
