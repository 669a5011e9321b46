"""Evaluation: VOC AP against hand-computed cases, VOC reading, the svm protocol end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from vidrep.data.synthetic import SHAPES
from vidrep.data.synthetic_voc import write_synthetic_voc
from vidrep.data.voc import VOCError, read_voc
from vidrep.eval.features import CheckpointError, load_network, pool_to_dims
from vidrep.eval.metrics import voc_classification_ap, voc_detection_ap
from vidrep.eval.report import gather
from vidrep.models.caffenet import CaffeNet


def _t(boxes, labels, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    difficult = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else torch.tensor(difficult)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


def _p(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


GT = [0, 0, 9, 9]


# ---------------------------------------------------------------- VOC AP, hand-computed


def test_perfect_detection():
    assert voc_detection_ap([_p([GT], [0.9], [0])], [_t([GT], [0])], num_classes=1) == {"map": 1.0, "ap": [1.0]}


def test_duplicate_is_a_false_positive_and_the_envelope_interpolates():
    # image 0: one object detected twice; image 1: one object, missed -> recall 0.5 at precision 1, then 0.5
    preds = [_p([GT, GT], [0.9, 0.8], [0, 0]), _p([], [], [])]
    targets = [_t([GT], [0]), _t([GT], [0])]
    assert voc_detection_ap(preds, targets, num_classes=1)["ap"] == [pytest.approx(0.5)]
    # 11-point: recall thresholds 0.0 .. 0.5 reach precision 1, 0.6 .. 1.0 nothing
    assert voc_detection_ap(preds, targets, num_classes=1, use_07_metric=True)["ap"] == [pytest.approx(6 / 11)]


def test_precision_envelope():
    # fp, tp, tp over 2 objects: precision 0, 1/2, 2/3 at recall 0, .5, 1 -> envelope 2/3 everywhere
    preds = [_p([[50, 50, 60, 60], GT], [0.9, 0.8], [0, 0]), _p([GT], [0.7], [0])]
    targets = [_t([GT], [0]), _t([GT], [0])]
    assert voc_detection_ap(preds, targets, num_classes=1)["ap"] == [pytest.approx(2 / 3)]


def test_difficult_objects_neither_count_nor_penalise():
    preds = [_p([GT, [20, 20, 29, 29]], [0.9, 0.8], [0, 0])]
    targets = [_t([GT, [20, 20, 29, 29]], [0, 0], [False, True])]
    assert voc_detection_ap(preds, targets, num_classes=1)["ap"] == [pytest.approx(1.0)]
    only_difficult = voc_detection_ap([_p([GT], [0.9], [0])], [_t([GT], [0], [True])], num_classes=1)
    assert np.isnan(only_difficult["ap"][0]) and np.isnan(only_difficult["map"])


def test_inclusive_coordinates_and_inclusive_threshold():
    # inclusive: GT is 10x10 = 100 px, [0,0,9,4] is 10x5 = 50 px inside it: IoU exactly 0.5 matches
    # (VOCevaldet.m: ovmax >= minoverlap)
    at_half = voc_detection_ap([_p([[0, 0, 9, 4]], [0.9], [0])], [_t([GT], [0])], num_classes=1)
    assert at_half["ap"] == [1.0]
    below = voc_detection_ap([_p([[0, 0, 9, 3]], [0.9], [0])], [_t([GT], [0])], num_classes=1)
    assert below["ap"] == [0.0]  # 40/100


def test_the_year_picks_the_ap_variant():
    from vidrep.eval.splits import use_07_metric_for

    assert use_07_metric_for(2007, None) is True and use_07_metric_for(2012, None) is False
    assert use_07_metric_for(2010, None) is False and use_07_metric_for(2012, True) is True
    assert use_07_metric_for(2007, False) is False


def test_images_without_objects_classes_without_detections_and_the_mean():
    preds = [_p([GT], [0.9], [0]), _p([GT], [0.95], [0])]  # the stronger detection is on an empty image
    targets = [_t([GT, [30, 30, 39, 39]], [0, 1]), _t([], [])]
    res = voc_detection_ap(preds, targets, num_classes=3)
    assert res["ap"][0] == pytest.approx(0.5)  # fp then tp: precision 1/2 at recall 1
    assert res["ap"][1] == 0.0  # an object, no detection
    assert np.isnan(res["ap"][2])  # no object at all: not in the mean
    assert res["map"] == pytest.approx(0.25)


def test_classification_ap_and_where_torchmetrics_differs():
    from torchmetrics.functional.classification import binary_average_precision

    scores = np.array([0.9, 0.8, 0.7, 0.6])
    monotone = np.array([1, -1, 1, -1])  # precision only falls: both agree
    assert voc_classification_ap(scores, monotone) == pytest.approx(
        binary_average_precision(torch.tensor(scores), torch.tensor(monotone > 0).long()).item()
    )
    rising = np.array([-1, 1, 1, -1])  # precision rises 1/2 -> 2/3: VOC interpolates, torchmetrics does not
    assert voc_classification_ap(scores, rising) == pytest.approx(2 / 3)
    assert binary_average_precision(torch.tensor(scores), torch.tensor(rising > 0).long()).item() == pytest.approx(
        7 / 12
    )
    ignored = np.array([-1, 0, 1, 1])  # a difficult-only image is ignored, not a negative
    assert voc_classification_ap(scores, ignored) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- VOC data

CLASSES = SHAPES


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    return write_synthetic_voc(tmp_path_factory.mktemp("voc"), num_trainval=30, num_test=30, height=120, width=160)


def test_reading_the_generated_tree(tiny_voc):
    train = read_voc(tiny_voc, 2007, "trainval", CLASSES)
    test = read_voc(tiny_voc, 2007, "test", CLASSES)
    assert len(train) == len(test) == 30
    boxes = np.concatenate([im.boxes for im in train])
    assert (boxes[:, 0] >= 1).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 0] < boxes[:, 2]).all()
    assert any(im.difficult.any() for im in train + test)
    im = next(im for im in train if im.difficult.any())
    labels = im.class_labels(len(CLASSES))
    assert set(labels) <= {-1, 0, 1} and (labels[im.labels[~im.difficult]] == 1).all()


def test_splits_follow_rcnn_and_overlap_is_refused():
    from vidrep.eval.splits import SplitOverlapError, check_disjoint, resolve_splits

    assert resolve_splits(2012, None, None) == ("train", "val")
    assert resolve_splits(2007, None, None) == ("trainval", "test")
    assert resolve_splits(2012, "trainval", "val") == ("trainval", "val")
    check_disjoint(["a", "b"], ["c"], "train", "val", 2012)
    with pytest.raises(
        SplitOverlapError, match=r"trainval and val share 2 of 3 test images \(b, c\).*voc.train_split=train"
    ):
        check_disjoint(["a", "b", "c"], ["b", "c", "d"], "trainval", "val", 2012)


def test_voc_errors_name_the_layout(tiny_voc, tmp_path):
    with pytest.raises(VOCError, match="Annotations"):
        read_voc(tmp_path, 2007, "trainval")
    with pytest.raises(VOCError, match="not in the configured classes"):
        read_voc(tiny_voc, 2007, "trainval")  # the 20 VOC classes: a circle is not one
    with pytest.raises(VOCError, match="split 'val'"):
        read_voc(tiny_voc, 2007, "val", CLASSES)


# ---------------------------------------------------------------- networks and features


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    trunk = CaffeNet(67, 64, 32)
    torch.save(
        {
            "state_dict": {f"net.trunk.{k}": v for k, v in trunk.state_dict().items()},
            "hyper_parameters": {"input_size": 67, "pixel_mean": [107.99, 102.75, 96.64]},
        },
        path,
    )
    return path


class _Arbitrary:
    pass


def test_checkpoint_of_the_wrong_kind_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vidrep train.py checkpoint"):
        load_network(str(tmp_path / "other.pt"))
    torch.save({"obj": _Arbitrary()}, tmp_path / "pickled.pt")  # needs full unpickling: refused
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_network(str(tmp_path / "pickled.pt"))
    with pytest.raises(CheckpointError, match="never downloads"):
        load_network("imagenet:" + str(tmp_path / "alexnet.pth"))


def test_conv_features_pool_to_about_9k():
    for channels, side in ((96, 55), (256, 27), (384, 13), (256, 13)):
        dims = pool_to_dims(torch.zeros(1, channels, side, side)).shape[1]
        assert 0.8 * 9216 <= dims <= 1.1 * 9216, (channels, dims)


# ---------------------------------------------------------------- the svm protocol end to end


def _evaluate(tmp_path, ckpt, *extra):
    fast_svm = (
        []
        if "protocol=detection" in extra
        else ["protocol.layers=[conv5,fc7]", "protocol.costs=[0.1,10]", "protocol.folds=2"]
    )
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"ckpt={ckpt}",
        f"voc.root={tmp_path / 'voc'}",
        f"voc.classes=[{','.join(CLASSES)}]",
        *fast_svm,
        f"cache_dir={tmp_path / 'cache'}",
        "wandb.enabled=false",
        "input_size=67",
        *extra,
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_weight_change_per_layer():
    import copy

    from vidrep.demo.check import format_weight_change, weight_change

    initial = CaffeNet(input_size=99, fc6_dim=16, fc7_dim=8)
    trained = copy.deepcopy(initial)
    with torch.no_grad():
        trained.conv2.weight.mul_(1.25)
        trained.fc7.weight.add_(initial.fc7.weight.flip(0) * 0.1)
    change = weight_change(trained, initial)
    assert list(change) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert change["conv2"] == pytest.approx(0.25, rel=1e-5) and change["conv1"] == change["fc6"] == 0.0
    expected = float((initial.fc7.weight.flip(0) * 0.1).norm() / initial.fc7.weight.norm())
    assert change["fc7"] == pytest.approx(expected, rel=1e-5)
    assert "conv2 25.0 %" in format_weight_change(change)


def test_svm_protocol_single_and_ensemble(tiny_voc, tmp_path):
    (tmp_path / "voc").symlink_to(tiny_voc)
    a, b = _checkpoint(tmp_path / "a.ckpt", 1), _checkpoint(tmp_path / "b.ckpt", 2)
    out = _evaluate(tmp_path, a, f"hydra.run.dir={tmp_path}/single")
    result = json.loads((tmp_path / "single" / "results.json").read_text())
    assert result["row"] == "unsup, no ft" and result["checkpoints"] == [str(a)]
    assert set(result["layers"]) == {"conv5", "fc7"} and result["best_layer"] in result["layers"]
    assert len(result["layers"]["fc7"]["ap"]) == len(CLASSES)
    assert result["protocol"]["costs"] == [0.1, 10] and result["data"]["num_test_images"] == 30
    assert all(0 <= ap <= 1 for r in result["layers"].values() for ap in r["ap"] if ap == ap)
    assert (tmp_path / "single" / "results.md").exists() and "| conv5" in out.stdout
    assert {p.name for p in (tmp_path / "single" / "pictures").iterdir()} == {"per_class_ap.png", "pr_curves.png"}
    assert all(c["pr"]["recall"][-1] == 1.0 for c in result["layers"]["fc7"]["classes"])
    # The single run above has the default workers; these two fit in this process (workers=1 gives
    # the same figures: tests/test_frozen.py) to spare the suite two process pools' start-up.
    _evaluate(tmp_path, f"[{a},{b}]", f"hydra.run.dir={tmp_path}/ensemble", "protocol.workers=1")
    ensemble = json.loads((tmp_path / "ensemble" / "results.json").read_text())
    assert ensemble["row"] == "unsup, no ft, ensemble" and len(ensemble["checkpoints"]) == 2
    _evaluate(tmp_path, "random", f"hydra.run.dir={tmp_path}/random", "pictures=false", "protocol.workers=1")
    assert not (tmp_path / "random" / "pictures").exists()
    table = gather([tmp_path / d / "results.json" for d in ("ensemble", "single", "random")])
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert rows == ["scratch", "unsup, no ft", "unsup, no ft, ensemble"]


def test_an_interrupted_svm_stage_resumes_without_recomputing(tiny_voc, tmp_path, monkeypatch):
    from vidrep.eval import svm
    from vidrep.eval.frozen import SvmProtocol

    train = read_voc(tiny_voc, 2007, "trainval", CLASSES)
    test = read_voc(tiny_voc, 2007, "test", CLASSES)
    net = load_network(str(_checkpoint(tmp_path / "a.ckpt", 1)))
    protocol = SvmProtocol(layers=["fc7"], costs=[0.1, 10.0], folds=2, workers=1)  # in this process: fits counted
    real_fit, calls = svm.fit_svm, []

    def counting_fit(*args, **kw):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt
        return real_fit(*args, **kw)

    monkeypatch.setattr(svm, "fit_svm", counting_fit)
    fail_after = 7
    with pytest.raises(KeyboardInterrupt):
        protocol.run([net], train, test, CLASSES, tmp_path / "cache", "k", "cpu")
    fail_after = None
    calls.clear()
    resumed = protocol.run([net], train, test, CLASSES, tmp_path / "cache", "k", "cpu")
    calls_after_resume = len(calls)
    calls.clear()
    fresh = protocol.run([net], train, test, CLASSES, tmp_path / "fresh", "k", "cpu")
    # full run: per class 2 costs x 2 folds + 1 refit = 5 fits (fewer for a class without positives)
    assert calls_after_resume <= len(calls) - 5  # at least the first class's finished work was kept
    assert resumed["layers"]["fc7"]["ap"] == pytest.approx(fresh["layers"]["fc7"]["ap"], nan_ok=True)


# ---------------------------------------------------------------- the detection protocol end to end

DETECTION_FAST = [
    "protocol=detection",
    "protocol.finetune_workers=0",
    "protocol.adapt.workers=0",
    "protocol.iterations=4",
    "protocol.batch_size=32",
    "protocol.fc_dim=64",
    "protocol.proposals.max_side=160",
    "protocol.proposals.max_proposals=16",
    "protocol.svm.norm_images=10",
]


@pytest.mark.parametrize("finetune", ["none"])  # straightforward: the VOC2012 test below
def test_detection_protocol(tiny_voc, tmp_path, finetune):
    (tmp_path / "voc").symlink_to(tiny_voc)
    a = _checkpoint(tmp_path / "a.ckpt", 1)
    _evaluate(
        tmp_path, a, "voc.year=2007", *DETECTION_FAST, f"protocol.finetune={finetune}", f"hydra.run.dir={tmp_path}/run"
    )
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    layer = "pool5" if finetune == "none" else "fc7"
    assert result["best_layer"] == layer and result["protocol"]["finetune"] == finetune
    assert result["row"] == ("unsup, no ft" if finetune == "none" else "unsup + ft")
    ap = result["layers"][layer]["ap"]
    assert len(ap) == len(CLASSES) and all(0 <= x <= 1 for x in ap)
    proposals = list((tmp_path / "cache" / "proposals").rglob("*.npy"))
    assert len(proposals) == 60  # cached once per image (trainval + test)


def test_iterative_finetuning_and_an_ensemble(tiny_voc, tiny_corpus, tmp_path):
    (tmp_path / "voc").symlink_to(tiny_voc)
    a, b = _checkpoint(tmp_path / "a.ckpt", 1), _checkpoint(tmp_path / "b.ckpt", 2)
    _evaluate(
        tmp_path,
        f"[{a},{b}]",
        "voc.year=2007",
        *DETECTION_FAST,
        "protocol.finetune=iterative",
        f"protocol.adapt.corpus={tiny_corpus}",
        "protocol.adapt.steps=2",
        "protocol.adapt.batch_size=8",
        "protocol.regions=roi_pool",
        "protocol.roi_pool.scale=120",
        f"hydra.run.dir={tmp_path}/run",
    )
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["row"] == "unsup + iterative ft" and len(result["checkpoints"]) == 2
    assert result["protocol"]["rounds"] == 2 and result["protocol"]["regions"] == "roi_pool"
    assert all(0 <= x <= 1 for x in result["layers"]["fc7"]["ap"])


def test_iterative_needs_a_corpus():
    from vidrep.eval.detection import DetectionProtocol

    with pytest.raises(ValueError, match="protocol.adapt.corpus"):
        DetectionProtocol(finetune="iterative")


def test_region_sampling_follows_rcnn_thresholds():
    from vidrep.eval.detection import DetectionProtocol
    from vidrep.eval.finetune import sample_rois

    p = DetectionProtocol(batch_size=16, images_per_batch=2, fg_fraction=0.5)
    gt = np.array([[0, 0, 99, 99]], np.float32)
    # IoU with the ground truth: 0.9 (foreground), 0.3 and 0.05 (background), 0 (background in R-CNN)
    props = np.array([[0, 0, 99, 89], [0, 0, 99, 29], [0, 0, 99, 4], [200, 200, 220, 220]], np.float32)
    rois, target = sample_rois(p, gt, np.array([3]), props, np.random.default_rng(0))
    got = sorted((tuple(r), t) for r, t in zip(rois.tolist(), target.tolist()))
    assert got == [
        ((0, 0, 99, 4), 0),
        ((0, 0, 99, 29), 0),
        ((0, 0, 99, 89), 4),
        ((0, 0, 99, 99), 4),
        ((200, 200, 220, 220), 0),
    ]  # class 3 -> 4 (0 = background)
    fast = DetectionProtocol(
        batch_size=16, images_per_batch=2, fg_fraction=0.5, bg_iou=[0.1, 0.5]
    )  # Fast R-CNN's range
    rois, target = sample_rois(fast, gt, np.array([3]), props, np.random.default_rng(0))
    assert sorted(tuple(r) for r in rois.tolist()) == [(0, 0, 99, 29), (0, 0, 99, 89), (0, 0, 99, 99)]


def test_imagenet_alexnet_weights_map_onto_the_trunk(tmp_path):
    from torchvision.models import alexnet

    reference = alexnet(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "alexnet.pth")
    net = load_network(f"imagenet:{tmp_path / 'alexnet.pth'}")
    x = torch.rand(2, 3, 227, 227)
    with torch.no_grad():
        ours = net.trunk.forward_features(x, ("pool5", "fc7"))
        theirs_pool5 = torch.flatten(reference.features(x), 1)
        theirs_fc7 = reference.classifier[:6](theirs_pool5)  # dropout is identity in eval
    torch.testing.assert_close(ours["pool5"], theirs_pool5)
    torch.testing.assert_close(ours["fc7"], theirs_fc7)


def test_detection_plumbing_is_exact_with_oracle_features(tiny_voc, tmp_path, monkeypatch):
    """With region features that are the IoU with each class's objects, SVMs + NMS + AP must reach
    AP 1: what the pipeline loses, it loses in the features, not in the bookkeeping."""
    from torchvision.ops import box_iou

    from vidrep.eval import detection, regions
    from vidrep.eval.features import random_network

    def oracle(p, model, net, im, boxes, device):
        iou = box_iou(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(im.boxes0)).numpy()
        return np.stack(
            [
                iou[:, im.labels == c].max(1) if (im.labels == c).any() else np.zeros(len(boxes))
                for c in range(len(CLASSES))
            ],
            1,
        ).astype(np.float32)

    monkeypatch.setattr(regions, "region_features", oracle)
    protocol = detection.DetectionProtocol(
        finetune="none", fc_dim=64, proposals={"max_side": 160, "mode": "fast", "max_proposals": 300, "min_size": 9}
    )
    train = read_voc(tiny_voc, 2007, "trainval", CLASSES)
    test = read_voc(tiny_voc, 2007, "test", CLASSES)
    result = protocol.run([random_network(67, 64, 32)], train, test, CLASSES, tmp_path, "k", "cpu")
    assert result["map"] > 0.95, result


def test_results_go_to_wandb_offline(tiny_voc, tmp_path):
    (tmp_path / "voc").symlink_to(tiny_voc)
    _evaluate(
        tmp_path,
        _checkpoint(tmp_path / "a.ckpt", 1),
        "wandb.enabled=true",
        "wandb.mode=offline",
        "protocol.layers=[fc7]",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_synthetic_voc_tree_of_another_size_is_not_reused(tmp_path):
    write_synthetic_voc(tmp_path, num_trainval=4, num_test=3, height=64, width=80)
    assert write_synthetic_voc(tmp_path, num_trainval=4, num_test=3, height=64, width=80) == tmp_path
    with pytest.raises(ValueError, match="4 trainval and 3 test images, not 6 and 3"):
        write_synthetic_voc(tmp_path, num_trainval=6, num_test=3, height=64, width=80)


@pytest.fixture(scope="module")
def tiny_voc2012(tmp_path_factory):
    return write_synthetic_voc(
        tmp_path_factory.mktemp("voc2012"), num_trainval=24, num_test=20, height=120, width=160, seed=7, year=2012
    )


@pytest.mark.slow
def test_the_readme_voc2012_command_trains_on_train_and_tests_on_val(tiny_voc2012, tmp_path):
    """The README's VOC2012 detection command (plus tiny sizes) on a VOC2012-format tree: R-CNN's
    train / val, disjoint and recorded; the old trainval / val choice is refused with the overlap."""
    (tmp_path / "voc").symlink_to(tiny_voc2012)
    a = _checkpoint(tmp_path / "a.ckpt", 1)
    _evaluate(tmp_path, a, *DETECTION_FAST, f"hydra.run.dir={tmp_path}/run")  # protocol=detection: VOC2012
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["splits"] == {"train": {"name": "train", "images": 24}, "test": {"name": "val", "images": 20}}
    assert result["protocol"]["use_07_metric"] is False  # VOC2012: all-point AP
    assert result["row"] == "unsup + ft" and result["best_layer"] == "fc7" and result["protocol"]["regions"] == "warp"
    assert len(result["layers"]["fc7"]["ap"]) == len(CLASSES) and all(
        0 <= x <= 1 for x in result["layers"]["fc7"]["ap"]
    )
    assert len(list((tmp_path / "cache" / "proposals").rglob("*.npy"))) == 44  # cached once per image (train + val)
    assert list((tmp_path / "cache" / "detection").glob("*/round0/metrics.csv"))  # the fine-tuning's curve
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"ckpt={a}",
        f"voc.root={tmp_path / 'voc'}",
        "voc.year=2012",
        "voc.train_split=trainval",
        "voc.test_split=val",
        f"voc.classes=[{','.join(CLASSES)}]",
        "protocol=detection",
        f"cache_dir={tmp_path / 'cache'}",
        "wandb.enabled=false",
        f"hydra.run.dir={tmp_path}/refused",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "trainval and val share 20 of 20 test images" in out.stderr


# ---------------------------------------------------------------- R-CNN's warped crop


def _imresize_bilinear_reference(window: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """MATLAB's imresize(window, [out_h out_w], 'bilinear', 'antialiasing', false), loop by loop:
    1-based x = u / s + 0.5 * (1 - 1 / s), triangle weights, indices mirrored (aux = [1:n, n:-1:1])."""

    def weights(n_in, n_out):
        s = n_out / n_in
        rows = []
        for u in range(1, n_out + 1):
            x = u / s + 0.5 * (1 - 1 / s)
            row = np.zeros(n_in)
            for k in range(int(np.floor(x)) - 1, int(np.floor(x)) + 3):
                wgt = max(0.0, 1 - abs(x - k))
                aux = list(range(1, n_in + 1)) + list(range(n_in, 0, -1))
                row[aux[(k - 1) % (2 * n_in)] - 1] += wgt
            rows.append(row / row.sum())
        return np.array(rows)

    wy, wx = weights(window.shape[0], out_h), weights(window.shape[1], out_w)
    return np.einsum("uy,vx,yxc->uvc", wy, wx, window)


def _rcnn_im_crop_reference(im: np.ndarray, box0, crop_size: int, padding: int) -> np.ndarray:
    """rcnn_im_crop.m (warp), statement by statement, with MATLAB's round; im [H, W, C], box 0-based;
    returns the crop with zeros where R-CNN pads (image mean already subtracted)."""

    def mround(v):
        return float(np.sign(v) * np.floor(abs(v) + 0.5))

    bbox = [float(v) + 1 for v in box0]
    scale = crop_size / (crop_size - padding * 2)
    half_height, half_width = (bbox[3] - bbox[1] + 1) / 2, (bbox[2] - bbox[0] + 1) / 2
    center = [bbox[0] + half_width, bbox[1] + half_height]
    bbox = [
        mround(center[0] - half_width * scale),
        mround(center[1] - half_height * scale),
        mround(center[0] + half_width * scale),
        mround(center[1] + half_height * scale),
    ]
    unclipped_height, unclipped_width = bbox[3] - bbox[1] + 1, bbox[2] - bbox[0] + 1
    pad_x1, pad_y1 = max(0, 1 - bbox[0]), max(0, 1 - bbox[1])
    bbox = [max(1, bbox[0]), max(1, bbox[1]), min(im.shape[1], bbox[2]), min(im.shape[0], bbox[3])]
    clipped_height, clipped_width = bbox[3] - bbox[1] + 1, bbox[2] - bbox[0] + 1
    scale_x, scale_y = crop_size / unclipped_width, crop_size / unclipped_height
    crop_width, crop_height = int(mround(clipped_width * scale_x)), int(mround(clipped_height * scale_y))
    pad_w, pad_h = int(mround(pad_x1 * scale_x)), int(mround(pad_y1 * scale_y))
    crop_height = min(crop_height, crop_size - pad_h)
    crop_width = min(crop_width, crop_size - pad_w)
    window = im[int(bbox[1]) - 1 : int(bbox[3]), int(bbox[0]) - 1 : int(bbox[2])]
    out = np.zeros((crop_size, crop_size, im.shape[2]))
    out[pad_h : pad_h + crop_height, pad_w : pad_w + crop_width] = _imresize_bilinear_reference(
        window, crop_height, crop_width
    )
    return out


def test_warped_crop_matches_rcnn_im_crop_brute_force():
    from vidrep.eval.warp import warp_regions

    rng = np.random.default_rng(0)
    im = rng.uniform(-100, 100, (37, 53, 3))  # already mean-subtracted, so padding is zero
    boxes = np.array(
        [
            [10, 8, 30, 25],  # inside, context fits
            [0, 0, 12, 9],  # top-left corner: context falls off two sides
            [40, 20, 52, 36],  # bottom-right corner
            [0, 0, 52, 36],  # the whole image
            [25, 3, 27, 33],  # thin: upsampled a lot along x
            [5, 30, 45, 36],
        ],
        np.float32,
    )
    crop_size, padding = 31, 4
    crops, mask = warp_regions(torch.from_numpy(im.transpose(2, 0, 1)).double(), boxes, crop_size, padding)
    ours = (crops * mask).permute(0, 2, 3, 1).double().numpy()
    for r, box in enumerate(boxes):
        expected = _rcnn_im_crop_reference(im, box, crop_size, padding)
        np.testing.assert_allclose(ours[r], expected, atol=2e-3, err_msg=f"box {box}")
    assert not mask[1, 0, 0, 0] and mask[1, 0, -1, -1]  # the corner box is padded top-left only


# ---------------------------------------------------------------- R-CNN's SVMs: bounded memory, passes as configured


class _FakeStore:
    """150 proposals per image, some on each object (the SVM stage needs nothing else of a store)."""

    def boxes(self, im):
        rng = np.random.default_rng(int(im.id))
        near = im.boxes[rng.integers(len(im.boxes), size=20)] - 1 + rng.normal(0, 3, (20, 4))
        xy = rng.uniform(0, 120, (130, 2))
        return np.concatenate([near, np.concatenate([xy, xy + rng.uniform(10, 40, (130, 2))], 1)]).astype(np.float32)


def _fake_images(n):
    from vidrep.data.voc import VOCImage

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 3))
        xy = rng.uniform(1, 100, (k, 2))
        out.append(
            VOCImage(
                str(i),
                None,
                np.concatenate([xy, xy + rng.uniform(20, 50, (k, 2))], 1).astype(np.float32),
                rng.integers(0, 4, k),
                np.zeros(k, bool),
            )
        )
    return out


def _fake_features(calls):
    """Region features [R, 256]: each class's IoU on its own coordinates plus noise (a learnable signal)."""
    from vidrep.eval.boxes import class_overlap

    def feats(im, boxes):
        calls.append(im.id)
        rng = np.random.default_rng(abs(hash((im.id, len(boxes)))) % 2**32)
        f = rng.normal(0, 0.3, (len(boxes), 256)).astype(np.float32)
        f[:, :4] += 3 * class_overlap(boxes, im.boxes0, im.labels, 4)
        return f

    return feats


def test_svm_stage_memory_does_not_grow_with_the_images(tmp_path):
    import tracemalloc

    from vidrep.eval.detection import DetectionProtocol
    from vidrep.eval.rcnn_svm import fit_rcnn_svm, train_svms

    # retraining every 300 new negatives keeps the cache near its steady state on a few dozen images;
    # with retrainings in worker processes the images held for a lagging class are bounded by max_lag
    # (128 by default, more than this test's images), so a small bound makes the growth visible
    protocol = DetectionProtocol(
        finetune="none", svm={**DetectionProtocol().svm, "retrain_limit": 300, "workers": 2, "max_lag": 4}
    )
    fit_rcnn_svm(np.ones((2, 3)), -np.ones((2, 3)))  # one-time allocations (imports, liblinear) out of the peaks
    peaks = {}
    for n in (30, 60):
        tracemalloc.start()
        train_svms(protocol, _fake_features([]), _fake_images(n), _FakeStore(), 4, tmp_path / str(n))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # holding every region's features (what the SVM stage did before) grows by 30 x 152 x 256 x 4 = 4.7 MB
    assert peaks[60] < 1.15 * peaks[30], peaks


@pytest.mark.parametrize("epochs", [1, 2])
def test_hard_negative_passes_are_as_configured(tmp_path, epochs):
    from vidrep.eval.detection import DetectionProtocol
    from vidrep.eval.rcnn_svm import train_svms

    protocol = DetectionProtocol(
        finetune="none", svm={**DetectionProtocol().svm, "epochs": epochs, "retrain_limit": 200}
    )
    images, calls = _fake_images(12), []
    W, B, _ = train_svms(protocol, _fake_features(calls), images, _FakeStore(), 4, tmp_path)
    with np.load(tmp_path / "svms.npz") as z:
        assert float(z["passes"]) == epochs
        # every class's final SVM is trained at the last image of the last pass, after its mining
        assert (z["last_update"] == epochs * len(images) - 1).all() and (z["updates"] >= 2).all()
    mining_calls = len(calls) - min(len(images), 200) - len(images)  # minus the scale and the positives passes
    assert mining_calls == epochs * len(images)


# ---------------------------------------------------------------- every stage resumes after kill -9


def _run_until(cmd, cwd, log, appears, timeout=300):
    """Start `cmd`; kill -9 it as soon as a file matching `appears` (a glob under cwd) exists, or
    let it finish when appears is None. Returns the return code."""
    import signal
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < timeout:
            if appears and list(Path(cwd).glob(appears)):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return -9
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        return proc.wait()


@pytest.mark.slow
def test_kill_9_in_every_stage_resumes_to_the_same_aps(tmp_path):
    voc = write_synthetic_voc(tmp_path / "voc", num_trainval=8, num_test=6, height=96, width=128, seed=3)
    a = _checkpoint(tmp_path / "a.ckpt", 1)

    def cmd(cache, run):
        return [
            sys.executable,
            str(ROOT / "evaluate.py"),
            f"ckpt={a}",
            f"voc.root={voc}",
            "voc.year=2007",
            f"voc.classes=[{','.join(CLASSES)}]",
            "protocol=detection",
            "protocol.iterations=12",
            "protocol.finetune_checkpoint_every=4",
            "protocol.batch_size=16",
            "protocol.finetune_workers=0",
            "protocol.fc_dim=64",
            "protocol.proposals.max_side=128",
            "protocol.proposals.max_proposals=24",
            "protocol.svm.norm_images=4",
            "protocol.svm.checkpoint_every=2",
            "protocol.test_chunk=2",
            f"cache_dir={tmp_path / cache}",
            "wandb.enabled=false",
            "pictures=false",
            f"hydra.run.dir={tmp_path / run}",
        ]

    assert _run_until(cmd("ref", "ref"), tmp_path, tmp_path / "ref.log", None) == 0
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())
    det = "cache/detection"
    assert _run_until(cmd("cache", "r1"), tmp_path, tmp_path / "1.log", f"{det}/*/round0/last.ckpt") == -9
    assert _run_until(cmd("cache", "r2"), tmp_path, tmp_path / "2.log", f"{det}/svm/*/mining.npz") == -9
    assert "fine-tuning resumes at step" in (tmp_path / "2.log").read_text()
    finetuned = next((tmp_path / "cache" / "detection").glob("*/finetuned.pt")).stat().st_mtime_ns
    assert _run_until(cmd("cache", "r3"), tmp_path, tmp_path / "3.log", f"{det}/test/*/chunk0000002.npz") == -9
    assert "hard-negative mining resumes at image" in (tmp_path / "3.log").read_text()
    svms = next((tmp_path / "cache" / "detection" / "svm").glob("*/svms.npz")).stat().st_mtime_ns
    first_chunk = next((tmp_path / "cache" / "detection" / "test").glob("*/chunk0000000.npz")).stat().st_mtime_ns
    assert _run_until(cmd("cache", "r4"), tmp_path, tmp_path / "4.log", None) == 0
    resumed = json.loads((tmp_path / "r4" / "results.json").read_text())
    assert resumed["layers"]["fc7"]["ap"] == pytest.approx(reference["layers"]["fc7"]["ap"], nan_ok=True)
    # finished stages were read, not redone
    assert next((tmp_path / "cache" / "detection").glob("*/finetuned.pt")).stat().st_mtime_ns == finetuned
    assert next((tmp_path / "cache" / "detection" / "svm").glob("*/svms.npz")).stat().st_mtime_ns == svms
    assert (
        next((tmp_path / "cache" / "detection" / "test").glob("*/chunk0000000.npz")).stat().st_mtime_ns == first_chunk
    )


# ---------------------------------------------------------------- proposals: R-CNN's .mat files, worker processes


def test_rcnn_selective_search_mat_files_are_read(tmp_path):
    from scipy.io import savemat

    from vidrep.data.voc import VOCImage
    from vidrep.eval.proposals import ProposalStore

    # R-CNN's layout: one file per split, `boxes` a cell of [P, 4] y1 x1 y2 x2 (1-based), `images` a cell of ids
    boxes = {
        "2008_000001": np.array([[11, 21, 40, 60], [1, 1, 100, 200]], float),
        "2008_000002": np.array([[5, 6, 7, 8]], float),
        "2008_000003": np.array([[2, 3, 50, 90]], float),
    }
    cell = lambda items: np.array(items + [None], dtype=object)[:-1]  # noqa: E731 - a 1-D object array, as MATLAB cells load
    (tmp_path / "ss").mkdir()
    savemat(
        tmp_path / "ss" / "voc_2012_train.mat",
        {"boxes": cell([boxes["2008_000001"], boxes["2008_000002"]]), "images": cell(["2008_000001", "2008_000002"])},
    )
    savemat(
        tmp_path / "ss" / "voc_2012_val.mat", {"boxes": cell([boxes["2008_000003"]]), "images": cell(["2008_000003"])}
    )
    images = [
        VOCImage(i, tmp_path / f"{i}.jpg", np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
        for i in boxes
    ]
    store = ProposalStore(tmp_path / "cache", "k", {"dir": str(tmp_path / "ss"), "workers": 1})
    store.ensure(images)
    np.testing.assert_array_equal(store.boxes(images[0]), [[20, 10, 59, 39], [0, 0, 199, 99]])  # x1 y1 x2 y2, 0-based
    np.testing.assert_array_equal(store.boxes(images[2]), [[2, 1, 89, 49]])
    missing = VOCImage("2008_000009", tmp_path / "x.jpg", *(images[0].boxes, images[0].labels, images[0].difficult))
    with pytest.raises(FileNotFoundError, match="1 images have no proposals"):
        store.ensure([missing])


def test_selective_search_in_worker_processes_matches_one_process(tiny_voc, tmp_path):
    from vidrep.eval.proposals import ProposalStore

    images = read_voc(tiny_voc, 2007, "trainval", CLASSES)[:4]
    settings = {"max_side": 160, "mode": "rcnn", "max_proposals": 50}
    one, two = (
        ProposalStore(tmp_path / "a", "k", {**settings, "workers": 1}),
        ProposalStore(tmp_path / "b", "k", {**settings, "workers": 2}),
    )
    one.ensure(images)
    two.ensure(images)
    for im in images:
        np.testing.assert_array_equal(one.boxes(im), two.boxes(im))


# ---------------------------------------------------------------- the frozen protocol as Goyal et al.


def test_goyal_pooling_per_layer_at_227():
    from vidrep.eval.features import fixed_pool
    from vidrep.models.caffenet import GOYAL_POOLING

    maps = {"conv1": (96, 55), "conv2": (256, 27), "conv3": (384, 13), "conv4": (384, 13), "conv5": (256, 13)}
    dims = {name: fixed_pool(torch.zeros(1, c, s, s), *GOYAL_POOLING[name]).shape[1] for name, (c, s) in maps.items()}
    assert dims == {"conv1": 9600, "conv2": 9216, "conv3": 9600, "conv4": 9600, "conv5": 9216}


def test_cross_validation_scores_as_sklearn_cross_val_score():
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC

    from vidrep.eval.svm import cross_validated_ap

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    labels = np.where(x[:, 0] + rng.normal(0, 1, 60) > 0.5, 1, -1)
    labels[:3] = 0  # difficult-only images: negatives in training and in the CV score, as theirs
    clf = LinearSVC(
        C=0.1,
        class_weight={1: 2, -1: 1},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        tol=0.0001,
        dual=True,
        max_iter=2000,
    )
    theirs = cross_val_score(clf, x, np.where(labels > 0, 1, -1), cv=3, scoring="average_precision").mean()
    assert cross_validated_ap(x, labels, 0.1, 3, 0, False, "goyal") == pytest.approx(theirs, abs=1e-6)


# ---------------------------------------------------------------- box helpers (torchvision) equal the old loops


def _old_box_overlap(boxes, gt):
    """The IoU that detection.py, windows.py and metrics.py computed by hand before (boxoverlap.m)."""
    out = np.zeros((len(boxes), len(gt)))
    for i, b in enumerate(np.asarray(boxes, np.float64)):
        for j, g in enumerate(np.asarray(gt, np.float64)):
            iw = max(min(b[2], g[2]) - max(b[0], g[0]) + 1, 0)
            ih = max(min(b[3], g[3]) - max(b[1], g[1]) + 1, 0)
            inter = iw * ih
            out[i, j] = inter / ((b[2] - b[0] + 1) * (b[3] - b[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter)
    return out


def _old_nms(boxes, scores, threshold):
    """detection.py's greedy NMS before (nms.m): stable descending order, drop IoU > threshold."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        order = order[1:][_old_box_overlap(boxes[i : i + 1], boxes[order[1:]])[0] <= threshold]
    return np.asarray(keep, np.int64)


def _random_boxes(rng, n, integer):
    xy = rng.integers(0, 50, (n, 2)) if integer else rng.uniform(0, 50, (n, 2))
    wh = rng.integers(0, 30, (n, 2)) if integer else rng.uniform(0, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes[rng.integers(0, n, n // 4)] = boxes[0]  # duplicate boxes
    return boxes


@pytest.mark.parametrize("integer", [True, False])
def test_box_helpers_equal_the_old_code_ties_included(integer):
    from vidrep.eval.boxes import box_iou, nms

    rng = np.random.default_rng(int(integer))
    for trial in range(200):
        n = int(rng.integers(1, 40))
        boxes = _random_boxes(rng, n, integer)
        scores = rng.integers(0, 4, n).astype(np.float32)  # many tied scores
        np.testing.assert_array_equal(box_iou(boxes, boxes[:5]), _old_box_overlap(boxes, boxes[:5]))
        threshold = (0.0, 0.3, 0.5, 0.7)[trial % 4]
        np.testing.assert_array_equal(nms(boxes, scores, threshold), _old_nms(boxes, scores, threshold))
    groups = rng.integers(0, 3, 30)
    boxes, scores = _random_boxes(rng, 30, integer), rng.random(30)
    per_group = np.sort(
        np.concatenate(
            [np.nonzero(groups == g)[0][_old_nms(boxes[groups == g], scores[groups == g], 0.3)] for g in range(3)]
        )
    )
    assert np.array_equal(np.sort(nms(boxes, scores, 0.3, groups)), per_group)


# ---------------------------------------------------------------- SVM caches and parallel classes


def test_negative_cache_grows_geometrically_and_evicts_in_place():
    from vidrep.eval.rcnn_svm import NegativeCache

    cache, capacities, rows = NegativeCache(3), [], []
    rng = np.random.default_rng(0)
    for i in range(200):
        x = rng.normal(size=(int(rng.integers(0, 40)), 3)).astype(np.float32)
        cache.add(x, np.arange(len(x)) + i * 1000)
        rows.append(x)
        capacities.append(cache.capacity)
    np.testing.assert_array_equal(cache.x, np.concatenate(rows))
    assert len(set(capacities)) <= 5 and cache.capacity < 2 * cache.n + 1024  # doublings, not one per image
    keep = cache.x[:, 0] > 0
    expected = cache.x[keep].copy()
    cache.keep(keep)
    np.testing.assert_array_equal(cache.x, expected)


def test_classes_retrained_in_parallel_processes_give_the_same_svms(tmp_path):
    """workers=2 (classes lag behind while their SVM retrains elsewhere) against one process: the same
    weights, caches, trainings; and a state saved mid-pass resumes to the same end."""
    from vidrep.eval.boxes import class_overlap
    from vidrep.eval.rcnn_svm import HardNegativeMiner

    images = _fake_images(24)
    feats, store = _fake_features([]), _FakeStore()

    def inputs(i):
        im = images[i]
        boxes = np.concatenate([im.boxes0, store.boxes(im)]).astype(np.float32)
        return feats(im, boxes), class_overlap(boxes, im.boxes0, im.labels, 4)

    positives = [np.random.default_rng(c).normal(1, 1, (6, 256)).astype(np.float32) for c in range(4)]
    kw = {"epochs": 2, "num_images": len(images), "retrain_limit": 60}

    def run(workers, max_lag, save_at=None):
        miner = HardNegativeMiner(positives, workers=workers, max_lag=max_lag, **kw)
        if save_at is None and (tmp_path / "state.npz").exists():
            miner.load(tmp_path / "state.npz")
        while not miner.done:
            miner.add_image(miner.position % len(images), *inputs(miner.position % len(images)))
            if miner.position == save_at:
                miner.save(tmp_path / "state.npz")
                miner.close()
                return None
        return (*miner.weights(), miner.updates.copy(), miner.last_update.copy(), miner.cache_sizes())

    serial = run(1, 1)
    parallel = run(2, 5)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    assert (serial[2] >= 3).all()  # several retrainings per class, so the lag was exercised
    run(2, 5, save_at=30)
    resumed = run(2, 5)
    for a, b in zip(serial, resumed):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- rcnn_test.m's max_per_set


def _rcnn_test_online(per_image_scores, max_per_set, max_per_image):
    """rcnn_test.m's loop for one class, literally: per image the boxes above the running threshold,
    their top max_per_image; the threshold raised to the max_per_set-th best score seen; at the end
    every kept box below the final threshold pruned. Returns the kept scores per image."""
    thresh, top_scores, count, kept = -np.inf, np.zeros(0), 0, []
    for z in per_image_scores:
        scores = z[z > thresh]
        ordered = np.sort(scores)[::-1][:max_per_image]
        kept.append(ordered)
        count += len(ordered)
        top_scores = np.sort(np.concatenate([top_scores, ordered]))[::-1]
        if count > max_per_set:
            top_scores = top_scores[:max_per_set]
            thresh = top_scores[-1]
    return [k[k >= thresh] for k in kept]


def test_max_per_set_prunes_as_rcnn_test():
    from vidrep.eval.rcnn_test import detect, set_thresholds

    rng = np.random.default_rng(0)
    per_image = [rng.normal(size=int(rng.integers(50, 300))) for _ in range(40)]
    max_per_set, max_per_image = 40 * 3, 20  # rcnn_test.m's 40 per image on 3 "images" worth, to bite
    boxes = [
        np.tile([[0, 0, 9, 9]], (len(s), 1)).astype(np.float32) + np.arange(len(s))[:, None] * 20 for s in per_image
    ]
    tops = [detect(s[:, None], b, np.zeros(1), max_per_image, 0.3)[1] for s, b in zip(per_image, boxes)]
    thresh = set_thresholds(
        np.concatenate([t["top_scores"] for t in tops]), np.concatenate([t["top_labels"] for t in tops]), 1, max_per_set
    )
    ours = [np.sort(t["top_scores"][t["top_scores"] >= thresh[0]])[::-1] for t in tops]
    theirs = _rcnn_test_online(per_image, max_per_set, max_per_image)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    assert sum(len(a) for a in ours) == max_per_set
    assert (set_thresholds(np.ones(5), np.zeros(5, int), 1, None) == -np.inf).all()


# ---------------------------------------------------------------- R-CNN's proposals and the VOC2012 defaults


def test_rcnn_selective_search_settings():
    import cv2

    from vidrep.eval.proposals import selective_search

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (150, 200, 3)).astype(np.uint8), (0, 0), 2)
    boxes = selective_search(img)
    widths, heights = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    assert len(boxes) and widths.min() >= 20 and heights.min() >= 20  # FilterBoxesWidth, minBoxWidth 20
    assert len(np.unique(boxes, axis=0)) == len(boxes)  # BoxRemoveDuplicates
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= 199 and boxes[:, 3].max() <= 149
    assert len(selective_search(img, min_size=5)) > len(boxes)  # the size filter is the only cut: no cap
    with pytest.raises(ValueError, match="protocol.proposals.mode"):
        selective_search(img, mode="slow")


def test_detection_defaults_to_voc2012_and_rcnn_70k(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "vidrep" / "conf"), version_base="1.3"):
        det = compose("evaluate", ["protocol=detection", "ckpt=random", f"voc.root={tmp_path}"])
        svm = compose("evaluate", ["protocol=svm", "ckpt=random", f"voc.root={tmp_path}"])
        chosen = compose("evaluate", ["protocol=detection", "ckpt=random", f"voc.root={tmp_path}", "voc.year=2007"])
    assert det.voc.year == 2012 and svm.voc.year == 2007 and chosen.voc.year == 2007
    p = det.protocol
    assert p.iterations == 70000 and p.max_per_set == 40 and p.proposals.mode == "rcnn"
    assert p.proposals.max_proposals is None and p.proposals.min_size == 20
    from vidrep import usable_cores

    assert p.proposals.workers == min(64, usable_cores()) and p.finetune_workers == min(14, usable_cores())
