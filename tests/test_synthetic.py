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


WORLD = {"num_objects": 3, "palette": "shared", "spin": 2.0, "breathe": 0.25, "lighting": 0.2}


def test_world_options_leave_the_plain_world_alone():
    """The options draw their randomness after the plain world's: seeds keep their videos."""
    plain, world = SyntheticVideo(4, num_frames=40), SyntheticVideo(4, num_frames=40, spin=2.0, lighting=0.2)
    np.testing.assert_array_equal(plain.boxes(20), world.boxes(20))
    assert plain.shapes == world.shapes


def test_shared_palette_colours_come_from_the_palette():
    from vidrep.data.synthetic import PALETTE, _colours

    colours = _colours(np.random.default_rng(0), 200, "shared")
    # every colour within the jitter (sd 8) of a palette entry: 5 sd
    nearest = np.abs(colours[:, None, :] - PALETTE[None]).max(axis=2).min(axis=1)
    assert nearest.max() < 40
    # and the palette is the same for every video: two videos' objects share colours
    a = {
        tuple(PALETTE[np.abs(c - PALETTE).max(axis=1).argmin()])
        for c in _colours(np.random.default_rng(1), 30, "shared")
    }
    b = {
        tuple(PALETTE[np.abs(c - PALETTE).max(axis=1).argmin()])
        for c in _colours(np.random.default_rng(2), 30, "shared")
    }
    assert len(a & b) >= 6


def test_objects_turn_grow_and_stay_inside():
    v = SyntheticVideo(1, num_frames=200, **WORLD)
    sides = np.stack([v.boxes(t)[:, 2] for t in range(0, 200, 5)])  # boxes only: no rendering
    assert (sides.max(axis=0) - sides.min(axis=0) >= 0.15 * v.sizes).all()  # each object's size swings
    for t in range(0, 200, 5):
        b = v.boxes(t)
        assert (b[:, :2] >= 0).all() and (b[:, 0] + b[:, 2] <= v.width).all() and (b[:, 1] + b[:, 3] <= v.height).all()
    # a turned object: its drawn pixels differ from the same object unturned at the same place and size
    still = SyntheticVideo(1, num_frames=40, **(WORLD | {"spin": 0.0}))
    v = SyntheticVideo(1, num_frames=40, **WORLD)
    x, y, w, h = v.boxes(30)[0]
    np.testing.assert_array_equal(v.boxes(30), still.boxes(30))
    assert np.abs(v.frame(30)[y : y + h, x : x + w].astype(int) - still.frame(30)[y : y + h, x : x + w]).mean() > 5


def test_lighting_drifts_slowly():
    """Brightness changes over a track's 30 frames, but never from one frame to the next by as much
    as a shot cut: the miner's cut detector finds no cut."""
    from vidrep.mining.shots import is_cut, thumbnail_histogram

    v = SyntheticVideo(2, num_frames=60, height=224, width=300, object_size=(35, 65), **WORLD)
    lit = [v.frame(t) for t in range(60)]
    means = np.array([f.mean() for f in lit])
    assert np.abs(means[30:] - means[:-30]).max() > 5
    hists = [thumbnail_histogram(f.mean(axis=2).astype(np.uint8)) for f in lit]
    assert not any(is_cut(a, b) for a, b in zip(hists, hists[1:]))
