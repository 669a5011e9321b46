"""Pictures: the selection maths against brute force, each figure's size and shape, the training
callback, mine.py viz=true, evaluate.py's charts, and the render command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY

from vidrep.eval.metrics import classification_pr, thin_curve, voc_classification_ap
from vidrep.viz.canvas import PictureSink, read_png
from vidrep.viz.evaluation import ap_bar_chart, pr_curves_figure, table_image
from vidrep.viz.mining import contact_sheet, mining_frame_figure
from vidrep.viz.training import (
    cross_video_neighbours,
    embed_2d,
    embedding_figure,
    filter_mosaic,
    filters_figure,
    hardest_chosen_negative,
    retrieval_figure,
    top_response_figure,
    top_response_indices,
    triplet_figure,
    unit_responses,
)

TRAINING_PICTURES = {"triplets.png", "retrieval.png", "conv1.png", "top_responses.png", "embedding.png"}


def _unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------- selection maths


def test_hardest_chosen_negative_matches_brute_force():
    a, p = _unit(6, 8, 0), _unit(6, 8, 1)
    mask = torch.rand(6, 12, generator=torch.Generator().manual_seed(2)) > 0.6
    mask[3] = False  # a pair without any negative
    index, s_pos, s_neg = hardest_chosen_negative(a, p, mask)
    patches = torch.cat([a, p])
    for i in range(6):
        assert s_pos[i] == pytest.approx(float(a[i] @ p[i]), abs=1e-6)
        chosen = [j for j in range(12) if mask[i, j]]
        if not chosen:
            assert index[i] == -1 and torch.isnan(s_neg[i])
            continue
        best = max(chosen, key=lambda j: float(a[i] @ patches[j]))
        assert index[i] == best and s_neg[i] == pytest.approx(float(a[i] @ patches[best]), abs=1e-6)


def test_cross_video_neighbours_match_brute_force_and_pad():
    q, g = _unit(4, 5, 3), _unit(9, 5, 4)
    qv, gv = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3])
    idx, sims = cross_video_neighbours(q, qv, g, gv, k=3)
    for i in range(4):
        others = sorted((j for j in range(9) if gv[j] != qv[i]), key=lambda j: -float(q[i] @ g[j]))[:3]
        assert idx[i].tolist() == others
        assert sims[i].tolist() == pytest.approx([float(q[i] @ g[j]) for j in others], abs=1e-6)
    # only 2 gallery items of other videos: the third slot is empty
    idx, sims = cross_video_neighbours(q[:1], qv[:1], g[:4], torch.tensor([0, 0, 1, 1]), k=3)
    assert idx[0, 2] == -1 and torch.isnan(sims[0, 2]) and set(idx[0, :2].tolist()) == {2, 3}


def test_top_responses_take_one_patch_per_video():
    pool5 = torch.rand(10, 4 * 9, generator=torch.Generator().manual_seed(5))
    responses = unit_responses(pool5, channels=4)
    assert torch.equal(responses, pool5.view(10, 4, 9).amax(2))
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    units, top = top_response_indices(responses, num_units=2, k=3, groups=groups)
    assert units.tolist() == responses.amax(0).argsort(descending=True)[:2].tolist()
    for u, row in zip(units.tolist(), top.tolist()):
        best_per_group = {}
        for i in range(10):
            g = int(groups[i])
            if g not in best_per_group or responses[i, u] > responses[best_per_group[g], u]:
                best_per_group[g] = i
        expected = sorted(best_per_group.values(), key=lambda i: -float(responses[i, u]))[:3]
        assert row == expected
    _, top = top_response_indices(responses, num_units=1, k=6, groups=groups)
    assert top[0, 4:].tolist() == [-1, -1]  # 4 videos: two slots stay empty


def test_filter_mosaic_layout_and_scaling():
    w = torch.randn(96, 3, 11, 11)
    w[5] = 0
    mosaic = filter_mosaic(w, columns=12, scale=4, gap=2)
    assert mosaic.shape == (8 * 46 + 2, 12 * 46 + 2, 3) and mosaic.dtype == np.uint8
    tile = mosaic[2 : 2 + 44, 2 + 5 * 46 : 2 + 5 * 46 + 44]
    assert np.all(tile == 128)  # a zero filter is mid grey
    first = mosaic[2:46, 2:46]
    assert first.min() == 0 or first.max() == 255  # each filter reaches black or white


def test_pr_curves_are_the_ones_behind_ap():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=300), rng.choice([1, -1, 0], size=300, p=[0.3, 0.6, 0.1])
    recall, precision = classification_pr(scores, labels)
    assert len(recall) == int((labels != 0).sum()) and recall[-1] == pytest.approx(1.0)
    thin = thin_curve((recall, precision), max_points=50)
    assert len(thin["recall"]) <= 50 and thin["recall"][0] == pytest.approx(recall[0], abs=1e-5)
    assert thin["recall"][-1] == pytest.approx(1.0) and thin["precision"][-1] == pytest.approx(precision[-1], abs=1e-5)
    assert voc_classification_ap(scores, labels) > 0 and classification_pr(scores, -np.abs(labels)) is None


# ---------------------------------------------------------------- figure sizes and shapes


def _patches(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _is_rgb(img):
    return img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and img.std() > 0


def test_training_figures_have_their_expected_sizes():
    # matplotlib's default 100 dpi: pixels = inches x 100
    t4 = triplet_figure(
        _patches(4), _patches(4, seed=1), _patches(4, seed=2), [0.9] * 4, [0.2, 0.5, float("nan"), 0.8], 0.5, "t"
    )
    t8 = triplet_figure(_patches(8), _patches(8, seed=1), _patches(8, seed=2), [0.9] * 8, [0.1] * 8, 0.5, "t")
    assert _is_rgb(t4) and t4.shape == (round(100 * (1.85 * 4 + 0.7)), 480, 3)
    assert t8.shape == (round(100 * (1.85 * 8 + 0.7)), 480, 3)
    sims = np.array([[0.9, 0.8, np.nan]] * 2)
    r = retrieval_figure(
        _patches(2), [[_patches(1)[0], _patches(1)[0], None]] * 2, sims, [1, 2], np.zeros((2, 3), int), "r"
    )
    assert _is_rgb(r) and r.shape == (round(100 * (1.85 * 2 + 0.7)), round(100 * 1.6 * 4), 3)
    units = top_response_figure([[p for p in _patches(3)]] * 2, [7, 9], np.ones((2, 3)), "u")
    assert _is_rgb(units) and units.shape == (round(100 * (1.85 * 2 + 0.7)), round(100 * (1.6 * 3 + 0.6)), 3)
    f = filters_figure(torch.randn(96, 3, 11, 11), "conv1")
    assert _is_rgb(f) and f.shape[1] > f.shape[0]
    xy = embed_2d(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), "tsne")
    assert xy.shape == (40, 2) and embed_2d(np.random.default_rng(1).normal(size=(5, 3)), "pca").shape == (5, 2)
    e = embedding_figure(xy, np.repeat(np.arange(10), 4), np.arange(40)[::-1], "tsne", "e")
    assert _is_rgb(e) and e.shape == (560, 640, 3)


def test_mining_figures_have_their_expected_sizes():
    frame = np.random.default_rng(0).integers(0, 255, (448, 600, 3), dtype=np.uint8)
    points = np.random.default_rng(1).uniform(0, 440, (50, 2))
    img = mining_frame_figure(
        frame, frame, points, np.arange(50) % 3 == 0, (10, 20, 227, 227), (30, 25, 227, 227), "f", 5, 35
    )
    assert _is_rgb(img) and img.shape == (round(100 * (12 * 448 / 1200 + 1.1)), 1200, 3)
    sheet = contact_sheet(
        [_patches(1)[0]] * 6, [_patches(1)[0]] * 6, [(i, i + 30) for i in range(6)], "s", pairs_per_row=4
    )
    assert _is_rgb(sheet) and sheet.shape == (round(100 * (1.85 * 2 + 0.7)), round(100 * 1.6 * 8), 3)


def _fake_result(label, classes, map_, with_pr=True, protocol="svm"):
    rng = np.random.default_rng(len(label))
    per_class = [
        {
            "class": c,
            "ap": float(a),
            "pr": thin_curve((np.linspace(0.05, 1, 20), np.linspace(1, 0.2, 20))) if with_pr else None,
        }
        for c, a in zip(classes, rng.uniform(0.1, 0.9, len(classes)))
    ]
    return {
        "row": "unsup, no ft",
        "label": label,
        "map": map_,
        "best_layer": "fc7",
        "protocol": {"name": protocol, "use_07_metric": True},
        "data": {"classes": classes, "year": 2007, "test_split": "test"},
        "layers": {"fc7": {"ap": [c["ap"] for c in per_class], "map": map_, "classes": per_class}},
    }


def test_evaluation_figures_have_their_expected_sizes():
    from vidrep.data.voc import VOC_CLASSES

    classes = list(VOC_CLASSES)
    a, b = _fake_result("a", classes, 0.4), _fake_result("bb", classes, 0.5, with_pr=False)
    bars = ap_bar_chart([a, b])
    assert _is_rgb(bars) and bars.shape[1] > bars.shape[0]
    pr = pr_curves_figure(a)
    assert _is_rgb(pr) and pr.shape == (round(100 * (2.2 * 4 + 0.8)), 1200, 3)  # 20 classes: 4 rows of 5
    assert pr_curves_figure(b).shape == pr.shape  # classes without a curve still get their panel
    table = table_image(["setting", "mAP"], [["scratch", "44.0"], ["unsup + ft", "47.5"]], "t")
    assert _is_rgb(table)
    with pytest.raises(ValueError, match="share their classes"):
        ap_bar_chart([a, _fake_result("c", classes[:3], 0.2)])


def test_picture_sink_writes_png_and_wandb_media(tmp_path):
    class FakeWandb:
        def __init__(self):
            self.calls = []

        def log_image(self, key, images, caption=None, step=None):
            self.calls.append((key, images[0].shape, caption, step))

    wb = FakeWandb()
    sink = PictureSink(tmp_path / "pics", [wb])
    img = np.zeros((10, 20, 3), np.uint8)
    sink.add("pictures/triplets", img, "c", step=7, tag="epoch001")
    assert read_png(tmp_path / "pics" / "epoch001" / "triplets.png").shape == (10, 20, 3)
    assert wb.calls == [("pictures/triplets", (10, 20, 3), ["c"], 7)]


# ---------------------------------------------------------------- the training callback


def _train(tmp_path, corpus, name, *extra):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY,
            f"data.root={corpus}",
            "~data.demo",
            "trainer.max_epochs=2",
            f"hydra.run.dir={tmp_path / name}",
            *extra,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp_path / name


@pytest.mark.slow
def test_training_pictures_every_epoch_and_nothing_when_off(tiny_corpus, tmp_path):
    on = _train(
        tmp_path,
        tiny_corpus,
        "on",
        "logger=wandb",
        "callbacks.pictures.every_n_epochs=1",
        "callbacks.pictures.embedding=pca",
    )
    for epoch in ("epoch001", "epoch002"):
        files = {p.name for p in (on / "pictures" / epoch).iterdir()}
        assert files == TRAINING_PICTURES
        triplets = read_png(on / "pictures" / epoch / "triplets.png")
        assert triplets.shape == (round(100 * (1.85 * 8 + 0.7)), 480, 3)  # 8 triplet rows, 3 columns
    media = list((on / "wandb").glob("offline-run-*/files/media/images/pictures/*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"triplets", "retrieval", "conv1", "embedding"}
    assert len(media) == 2 * len(TRAINING_PICTURES)
    off = _train(tmp_path, tiny_corpus, "off", "logger=csv", "callbacks.pictures.every_n_epochs=0")
    assert not (off / "pictures").exists()
    # Pictures draw no random numbers from training's stream: the same weights with and without.
    same = _train(
        tmp_path,
        tiny_corpus,
        "csv_on",
        "logger=csv",
        "callbacks.pictures.every_n_epochs=1",
        "callbacks.pictures.embedding=pca",
    )
    a = torch.load(off / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(same / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The render command draws the same set for the checkpoint, from its run's held-out pairs.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidrep.viz",
            "train",
            "--ckpt",
            str(off / "checkpoints" / "last.ckpt"),
            "--embedding",
            "pca",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rendered = [Path(line) for line in out.stdout.split()]
    assert {p.name for p in rendered} == TRAINING_PICTURES and all(
        p.parent.parent == off / "pictures" for p in rendered
    )


# ---------------------------------------------------------------- mining and the corpus


@pytest.mark.slow
def test_mine_viz_draws_frames_and_contact_sheets(tiny_corpus, tmp_path):
    videos = tiny_corpus.parent / f"{tiny_corpus.name}-videos"
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    cmd = [
        sys.executable,
        str(ROOT / "mine.py"),
        f"videos={videos}",
        f"out={corpus}",
        "progress=false",
        "workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = subprocess.run([*cmd, "viz=true", "viz_videos=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    drawn = sorted((corpus / "pictures").iterdir())
    assert len(drawn) == 3
    names = {p.stem for p in videos.iterdir()}
    for folder in drawn:
        assert folder.name.rsplit("-", 1)[0] in names and len(folder.name.rsplit("-", 1)[1]) == 16  # <video name>-<id>
        assert {p.name for p in folder.iterdir()} == {"frame.png", "pairs.png"}
        assert read_png(folder / "frame.png").shape == (round(100 * (12 * 448 / 1200 + 1.1)), 1200, 3)
        assert read_png(folder / "pairs.png").shape[1] == round(100 * 1.6 * 8)  # 4 pairs (8 patches) per row
    shutil.rmtree(corpus / "pictures")
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not (corpus / "pictures").exists()
    # without the videos, the render command still draws the contact sheets
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vidrep.viz",
            "corpus",
            str(corpus),
            "--max-videos",
            "2",
            "--out",
            str(tmp_path / "sheets"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(Path(p).name for p in out.stdout.split()) == ["pairs.png", "pairs.png"]


def test_render_eval_pictures(tmp_path):
    classes = ["a", "b", "c"]
    paths = []
    for i, label in enumerate(("one", "two")):
        (tmp_path / label).mkdir()
        paths.append(tmp_path / label / "results.json")
        paths[-1].write_text(json.dumps(_fake_result(label, classes, 0.3 + i / 10)))
    out = subprocess.run(
        [sys.executable, "-m", "vidrep.viz", "eval", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert {p.name for p in (tmp_path / "one" / "pictures").iterdir() if p.is_file()} == {
        "per_class_ap.png",
        "pr_curves.png",
    }
    assert {p.name for p in (tmp_path / "one" / "pictures" / "comparison").iterdir()} == {
        "paper_table.png",
        "per_class_ap.png",
    }
    assert read_png(tmp_path / "two" / "pictures" / "pr_curves.png").shape == (round(100 * (2.2 + 0.8)), 1200, 3)


def test_render_command_errors_name_the_input(tmp_path):
    for args, message in (
        (["corpus", str(tmp_path / "nope")], "is not a vidrep corpus"),
        (["train", "--ckpt", str(tmp_path / "nope.ckpt")], "does not exist"),
        (["eval", str(tmp_path / "nope.json")], "not found"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "vidrep.viz", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr
