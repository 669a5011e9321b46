import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to a W&B server and never prompt.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """12 synthetic videos of 220 frames, mined like the demo (up to 6 pairs each)."""
    from vidrep.demo.corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("corpus") / "tiny", num_videos=12, num_frames=220, progress=False)


# Overrides that make any training run tiny: 67x67 patches, a 64/32 head, no progress bar.
TINY = [
    "model.input_size=67",
    "model.net.trunk.fc6_dim=64",
    "model.net.trunk.fc7_dim=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.val_fraction=0.25",
    "~callbacks.progress",
    "trainer.accelerator=cpu",
    "~callbacks.demo_check",
    "callbacks.pictures.every_n_epochs=0",  # tests/test_viz.py turns them on
    "trainer.max_steps=-1",  # data=demo's 20-step run; the tests bound their runs by epochs or steps themselves
]


SAMPLE_VIDEOS = ("vtest.avi", "Megamind.avi", "Megamind_bugy.avi")


def _fetch_opencv_doc(dest: Path) -> None:
    """Debian's opencv-doc package ships real sample videos; `apt-get download` needs no root (but
    current package lists: .ci/run runs `apt-get update` first)."""
    import shutil
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True, capture_output=True, timeout=600)
        deb = next(Path(tmp).glob("opencv-doc_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True, capture_output=True, timeout=600)
        data = Path(tmp) / "x/usr/share/doc/opencv-doc/examples/data"
        staging = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in SAMPLE_VIDEOS:
            shutil.copy(data / name, staging / name)
        staging.rename(dest)


@pytest.fixture(scope="session")
def sample_videos() -> Path:
    """vtest.avi, Megamind.avi and Megamind_bugy.avi from opencv-doc, fetched once into the cache.
    Skipped when they cannot be had, unless VIDREP_REQUIRE_SAMPLE_VIDEOS=1 (as in CI)."""
    cache = Path(os.environ.get("VIDREP_CACHE_DIR", Path.home() / ".cache/vidrep")) / "opencv-sample-videos"
    if not all((cache / n).exists() for n in SAMPLE_VIDEOS):
        try:
            _fetch_opencv_doc(cache)
        except Exception as e:  # noqa: BLE001 - any failure to fetch means the same: no sample videos
            if os.environ.get("VIDREP_REQUIRE_SAMPLE_VIDEOS") == "1":
                raise RuntimeError(f"could not fetch the opencv-doc sample videos into {cache}: {e!r}") from e
            pytest.skip(f"opencv-doc sample videos unavailable ({e!r}); run `apt-get update` or set VIDREP_CACHE_DIR")
    return cache


class CrashingMiner:
    """A miner whose process dies (as a native crash would kill it) on videos named crash*.
    Module-level, so spawned mining workers can unpickle it."""

    def __init__(self, config) -> None:
        from vidrep.mining.miner import VideoMiner

        self.inner = VideoMiner(config)

    def mine(self, path, name=None):
        if Path(path).name.startswith("crash"):
            os._exit(139)
        return self.inner.mine(path, name)


class HangingMiner(CrashingMiner):
    """Also never returns (as a hung native decoder would not) on videos named hang*."""

    def mine(self, path, name=None):
        if Path(path).name.startswith("hang"):
            import time

            while True:
                time.sleep(60)
        return super().mine(path, name)


class KillAfterEpoch:
    """A callback whose process kills itself with SIGKILL (as `kill -9` would) once epoch `epoch`
    (0-based) is over: as the next epoch starts, after every hook of that epoch's end. Run with
    tests/ on PYTHONPATH."""

    def __new__(cls, epoch: int):
        import signal

        import lightning as L

        class _Kill(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == epoch + 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()
