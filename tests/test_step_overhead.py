"""Per-step overhead: the callbacks of a training step must not read device values every step."""

from types import SimpleNamespace

import pytest
import torch

from vidrep.training.callbacks import StopOnNonFiniteLoss


def _run(callback, losses):
    """Feeds the callback one loss per step as Lightning would (global_step already counts the
    step at its end); returns the step it stopped at."""
    trainer = SimpleNamespace(global_step=0, should_stop=False, is_last_batch=False)
    for step, loss in enumerate(losses):
        trainer.global_step, trainer.is_last_batch = step + 1, step == len(losses) - 1
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
        if trainer.should_stop:
            return step
    return None


@pytest.mark.parametrize("every", [1, 4])
def test_non_finite_loss_stops_within_every_n_steps_and_names_the_first_bad_step(every):
    losses = [1.0, 0.9, 0.8, float("nan"), 0.7, float("inf"), 0.6, 0.5, 0.4, 0.3]
    callback = StopOnNonFiniteLoss(every_n_steps=every)
    stopped = _run(callback, losses)
    assert callback.stopped_at == 3
    assert stopped == 3  # with every=4, steps 0-3 are checked together at step 3
    late = StopOnNonFiniteLoss(every_n_steps=4)
    assert _run(late, [1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]) == 7 and late.stopped_at == 4


def test_finite_losses_never_stop_and_the_last_batch_is_checked():
    assert _run(StopOnNonFiniteLoss(every_n_steps=50), [1.0] * 120) is None
    callback = StopOnNonFiniteLoss(every_n_steps=50)
    assert _run(callback, [1.0, float("nan"), 1.0]) == 2 and callback.stopped_at == 1
    with pytest.raises(ValueError, match="every_n_steps"):
        StopOnNonFiniteLoss(every_n_steps=0)


def test_a_run_that_stops_between_reads_still_sees_the_non_finite_loss():
    """max_steps (or another callback) may end training before the next read: the flag is read
    when training ends and before every checkpoint is saved."""
    for hook in ("on_train_end", "on_save_checkpoint"):
        callback = StopOnNonFiniteLoss(every_n_steps=50)
        trainer = SimpleNamespace(global_step=0, should_stop=False, is_last_batch=False)
        for step, loss in enumerate([1.0, 1.0, float("nan"), 1.0]):
            trainer.global_step = step + 1
            callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
        assert callback.stopped_at is None and not trainer.should_stop  # no read yet: no sync
        getattr(callback, hook)(trainer, None, *([{}] if hook == "on_save_checkpoint" else []))
        assert callback.stopped_at == 2 and trainer.should_stop
