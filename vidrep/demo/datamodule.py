"""data=demo's data module: the pair data module over a corpus it builds on first use."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from vidrep.data.datamodule import PairDataModule
from vidrep.demo.corpus import build_demo_corpus
from vidrep.eval.distractors import write_distractors

log = logging.getLogger(__name__)


class DemoDataModule(PairDataModule):
    """`demo` ({num_videos, num_frames, seed, world}): the synthetic corpus to build at `root` when it is not
    there yet, with the hard protocol's distractors (once; cached afterwards). `data.demo=null` (or
    `~data.demo`) trains on `root` as is."""

    def __init__(self, *args, demo: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # plain containers: the options are written to the corpus's demo.json
        self.demo = OmegaConf.to_container(demo, resolve=True) if isinstance(demo, DictConfig) else demo
        self.demo = dict(self.demo) if self.demo else None

    def prepare_data(self) -> None:
        if self.demo is not None:
            if not (self.root / "demo.json").exists():
                log.info("building the demo corpus at %s (once; cached afterwards)", self.root)
                build_demo_corpus(self.root, **self.demo)
            # The retrieval monitor's hard protocol needs them (else it warns and falls back to
            # other_videos); ~0.05 s a video, once: videos already cut are skipped.
            write_distractors(self.root, self.root.with_name(f"{self.root.name}-videos"))
        super().prepare_data()
