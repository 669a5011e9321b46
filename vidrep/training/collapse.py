"""A warning when the embedding collapses: every patch mapped to (nearly) one point, so every
similarity is ~1, the loss sits at the margin and nothing is learned. Training runs on; the user
is told what usually causes it and which settings to try.

At the end of training it also says whether the held-out triplets are ordered better than at the
first validation (step 0, vidrep/training/start.py): learning is judged by val/triplet_acc (and
the retrieval monitor's recall), never by val/loss. At the initialisation the embeddings are
nearly collinear (mean cosine ~0.96), so the hinge falls as they spread apart whether or not they
are ordered: a measured run's val/loss fell 0.485 -> 0.245 while val/triplet_acc fell 0.92 -> 0.86."""

from __future__ import annotations

import logging
import math

import lightning as L

log = logging.getLogger(__name__)

ADVICE = (
    "Usual causes: the paper's network (227 input, released Gaussian init, biases of 1) on a CPU or in a "
    "short run, where it starts collapsed (try experiment=cpu, or model.net.trunk.init=kaiming "
    "model.net.trunk.bias_one=false); a learning rate too high or too low (model.optimizer.lr); batches "
    "with few videos (data.batch_size)."
)


def collapse_reason(
    embed_std: float, sim_pos: float, sim_neg: float, dim: int | None, std_ratio: float = 0.05, min_gap: float = 1e-3
) -> str | None:
    """Why a batch's statistics say the embedding has collapsed, or None when they do not.

    Two signs, either suffices: the mean per-dimension spread is `std_ratio` or less of what
    unit vectors spread evenly over `dim` dimensions have (1/sqrt(dim)); or anchors are as close to
    their negatives as to their positives (gap under `min_gap`) with both near 1.
    """
    if dim and embed_std < std_ratio / math.sqrt(dim):
        even = 1 / math.sqrt(dim)
        return (
            f"embed_std {embed_std:.1e}, under {std_ratio:g} x the {even:.3f} of an even spread over {dim} dimensions"
        )
    if sim_neg > 0.99 and sim_pos - sim_neg < min_gap:
        return f"s(anchor, positive) {sim_pos:.4f} and s(anchor, negative) {sim_neg:.4f}: no gap"
    return None


class CollapseWarning(L.Callback):
    """Watches train/embed_std and the positive/negative similarity gap every `every_n_steps`
    steps from `warmup_steps` on (the paper's network starts collapsed, embed_std ~2e-4, and may
    leave it early); after `patience` collapsed checks in a row it warns once (log line, W&B summary
    and alert), and again at the end of training if the run ends collapsed."""

    def __init__(
        self,
        every_n_steps: int = 50,
        warmup_steps: int = 1000,
        patience: int = 3,
        std_ratio: float = 0.05,
        min_gap: float = 1e-3,
    ) -> None:
        self.every_n_steps, self.warmup_steps, self.patience = every_n_steps, warmup_steps, patience
        self.std_ratio, self.min_gap = std_ratio, min_gap
        self.in_a_row = 0
        self.warned_at: int | None = None
        self.triplet_acc: list[tuple[int, float]] = []  # (step, val/triplet_acc) of each validation

    def _reason(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        m = trainer.callback_metrics
        keys = ("train/embed_std_step", "train/sim_pos_step", "train/sim_neg_step")
        if not all(k in m for k in keys):
            return None
        std, pos, neg = (float(m[k]) for k in keys)  # a host sync, only every N steps
        return collapse_reason(
            std, pos, neg, getattr(getattr(pl_module, "net", None), "out_dim", None), self.std_ratio, self.min_gap
        )

    def _warn(self, trainer: L.Trainer, reason: str, when: str) -> None:
        text = f"the embedding has collapsed {when} (step {trainer.global_step}): {reason}. {ADVICE}"
        log.warning(text)
        for lg in trainer.loggers:
            run = getattr(lg, "experiment", None) if type(lg).__name__ == "WandbLogger" else None
            if run is None or not trainer.is_global_zero:
                continue
            run.summary["collapse/step"] = trainer.global_step
            run.summary["collapse/reason"] = reason
            try:
                run.alert(title="vidrep: embedding collapsed", text=text)
            except Exception as e:  # noqa: BLE001 - an alert that cannot be sent (offline) must not stop training
                log.debug("W&B alert not sent: %r", e)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step < self.warmup_steps or step % self.every_n_steps:
            return
        reason = self._reason(trainer, pl_module)
        self.in_a_row = self.in_a_row + 1 if reason else 0
        if reason and self.in_a_row >= self.patience and self.warned_at is None:
            self.warned_at = step
            self._warn(trainer, reason, f"for {self.in_a_row} checks in a row")
        elif not reason:
            self.warned_at = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/triplet_acc")
        if acc is not None and not trainer.sanity_checking:
            self.triplet_acc.append((trainer.global_step, float(acc)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = self._reason(trainer, pl_module)
        if reason and self.warned_at is None:
            self._warn(trainer, reason, "at the end of training")
        verdict = learning_verdict(self.triplet_acc)
        if verdict is not None:
            (log.warning if verdict.startswith("no gain") else log.info)(verdict)


def learning_verdict(triplet_acc: list[tuple[int, float]]) -> str | None:
    """What val/triplet_acc at the first and the last validation say about learning (None with fewer
    than two validations at different steps)."""
    if len(triplet_acc) < 2 or triplet_acc[0][0] == triplet_acc[-1][0]:
        return None
    (s0, a0), (s1, a1) = triplet_acc[0], triplet_acc[-1]
    figures = f"val/triplet_acc {a0:.3f} at step {s0}, {a1:.3f} at step {s1}"
    if a1 > a0:
        return f"held-out triplets ordered better than at the start: {figures}"
    return (
        f"no gain over the initialisation on held-out triplets: {figures}. A falling val/loss is no evidence of "
        "learning (it falls as the nearly collinear initial embeddings spread apart); read val/triplet_acc and "
        "the retrieval monitor's monitor/*/recall_at_1, and compare the run with its initialisation: "
        "python evaluate.py protocol=retrieval run=<run dir>"
    )
