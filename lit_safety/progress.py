"""``RunProgress``: progress over the whole run, not per epoch.

In a terminal it is one bar over the run's optimizer steps (a resumed run starts where it stopped);
when stdout is a file or a pipe (CI, ``nohup``) it prints a line every ``interval`` seconds with the
step, loss, steps per second and the time left for the whole run. It also logs the throughput
(``train/tokens_per_second``, ``train/steps_per_second``) to the logger.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar


def _tokens(batch) -> int:
    """Real (unpadded) tokens of a training batch, over every stream and sequence kind."""
    if not isinstance(batch, dict):
        return 0
    return sum(int(s["attention_mask"].sum()) for stream in batch.values() if isinstance(stream, dict)
               for s in stream.values() if isinstance(s, dict) and "attention_mask" in s)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunProgress(ProgressBar):
    """Run-level progress: a bar in a terminal, a log line every ``interval`` seconds otherwise.

    Args:
        interval: seconds between log lines when stdout is not a terminal.
    """

    def __init__(self, interval: float = 15.0):
        super().__init__()
        self.interval = interval
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._total = int(trainer.estimated_stepping_batches)
        self._start_step, self._start = trainer.global_step, time.perf_counter()
        self._last_line, self._last_step, self._last_time, self._tokens = self._start, trainer.global_step, self._start, 0
        if self._enabled and trainer.is_global_zero and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, initial=trainer.global_step, desc="fit", unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += _tokens(batch)
        step, now = trainer.global_step, time.perf_counter()
        if step == self._last_step or not trainer.is_global_zero:
            return
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = float(value) if value is not None else float("nan")
        if trainer.logger is not None and now > self._last_time:
            trainer.logger.log_metrics({"train/steps_per_second": (step - self._last_step) / (now - self._last_time),
                                        "train/tokens_per_second": self._tokens / (now - self._last_time)}, step=step)
        self._last_step, self._last_time, self._tokens = step, now, 0
        if not self._enabled:
            return
        rate = (step - self._start_step) / max(now - self._start, 1e-9)
        left = (self._total - step) / rate if rate > 0 else float("inf")
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self._bar.update(step - self._bar.n)
        elif now - self._last_line >= self.interval or step == self._total:
            self._last_line = now
            print(f"step {step}/{self._total} | loss {loss:.4g} | {rate:.2f} steps/s | "
                  f"{_duration(now - self._start)} elapsed, {_duration(left)} left", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
