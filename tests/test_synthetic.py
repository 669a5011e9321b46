import numpy as np

from vidrep.data.synthetic import SyntheticVideo


def test_deterministic_by_seed():
    a, b, c = SyntheticVideo(5, num_frames=40), SyntheticVideo(5, num_frames=40), SyntheticVideo(6, num_frames=40)
    np.testing.assert_array_equal(a.frame(17), b.frame(17))
    np.testing.assert_array_equal(a.boxes(30), b.boxes(30))
    assert not np.array_equal(a.frame(17), c.frame(17))


def test_boxes_stay_inside_and_objects_move():
    v = SyntheticVideo(1, num_frames=200, num_objects=3)
    for t in range(0, 200, 7):
        b = v.boxes(t)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 0] + b[:, 2] <= v.width).all() and (b[:, 1] + b[:, 3] <= v.height).all()
    assert np.abs(v.boxes(30)[:, :2] - v.boxes(0)[:, :2]).max() >= 30


def test_object_is_drawn_in_its_box():
    v = SyntheticVideo(3, num_frames=40, num_objects=1, pan=(0.0, 0.0))
    empty = SyntheticVideo(3, num_frames=40, num_objects=0, pan=(0.0, 0.0))
    x, y, w, h = v.boxes(10)[0]
    diff = np.abs(v.frame(10).astype(int) - empty.frame(10).astype(int)).sum(axis=2) > 0
    ys, xs = np.nonzero(diff)
    assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
    assert diff[y : y + h, x : x + w].mean() > 0.3


def test_pan_shifts_background():
    v = SyntheticVideo(2, num_frames=20, num_objects=0, pan=(3.0, 0.0))
    f0, f5 = v.frame(0).astype(int), v.frame(5).astype(int)
    # the camera moves right by 15 px: frame 5's content is frame 0's shifted left by 15
    assert np.abs(f5[:, :-15] - f0[:, 15:]).mean() < 2.0


def test_write_video(tmp_path):
    import cv2

    path = SyntheticVideo(0, num_frames=12).write(tmp_path / "v.avi")
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 12
