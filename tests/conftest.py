import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never talk to a W&B server and never prompt.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """12 synthetic videos x 4 pairs, 2 videos per shard (48 pairs)."""
    from vidrep.data.demo import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("corpus") / "tiny", num_videos=12, pairs_per_video=4, videos_per_shard=2)


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
]
