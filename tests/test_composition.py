"""The README's Python paths: a method composed with a user's own LightningDataModule, a user
callback and a plain Trainer; the README's example as written; a new method as README's "Adding a
method" shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch

from lit_safety import RefusalSFTModule
from lit_safety.data import ChatFormatter, DataError, Record
from lit_safety.data.batch import collate_stream

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_blocks(language: str, after: str | None = None) -> list[str]:
    text = open(README).read()
    if after is not None:
        text = text[text.index(after):]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


class MyData(L.LightningDataModule):
    """A user's own data module: records of their own, batched with ``collate_stream``."""

    def __init__(self, tokenizer, streams: dict[str, list[Record]]):
        super().__init__()
        self.formatter, self.streams = ChatFormatter(tokenizer, 16, 8), streams

    def train_dataloader(self):
        loaders = {name: torch.utils.data.DataLoader(records, batch_size=4, collate_fn=lambda r: collate_stream(r, self.formatter))
                   for name, records in self.streams.items()}
        return L.pytorch.utilities.CombinedLoader(loaders, mode="max_size_cycle")


class CountSteps(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def records(kind: str, n: int = 8) -> list[Record]:
    return [Record(messages=[{"role": "user", "content": f"make {'bomb' if kind == 'harmful' else 'apple'} reverse {i % 4 + 1} 2"}], kind=kind,
                   completion="ok : 2 1", refusal="sorry i cannot help" if kind == "harmful" else None)
            for i in range(n)]


def test_a_method_trains_on_a_users_own_datamodule_with_a_plain_trainer(tiny_model_dir):
    module = RefusalSFTModule(base_model=tiny_model_dir, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    data = MyData(module.tokenizer, {"harmful": records("harmful"), "benign": records("benign")})
    counter = CountSteps()
    L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              callbacks=[counter]).fit(module, data)
    assert len(counter.losses) == 6 and counter.losses[-1] < counter.losses[0]


def test_a_batch_without_a_needed_stream_names_it(tiny_model_dir):
    module = RefusalSFTModule(base_model=tiny_model_dir)
    data = MyData(module.tokenizer, {"benign": records("benign")})  # no harmful stream
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    with pytest.raises(DataError, match="RefusalSFTModule needs a 'harmful' stream"):
        trainer.fit(module, data)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (example,) = readme_blocks("python", after="In Python the modules compose")[:1]
    exec(compile(example, "README.md", "exec"), {})
    assert os.path.isfile(tmp_path / "my_adapter" / "adapter_config.json")


def test_readme_new_method_is_one_file_and_a_config(tmp_path):
    after = "### Adding a method"
    (method,) = readme_blocks("python", after)[:1]
    (config,) = readme_blocks("yaml", after)[:1]
    (command,) = readme_blocks("bash", after)[:1]
    (tmp_path / "my_methods.py").write_text(method)
    (tmp_path / "my_method.yaml").write_text(config)
    env = {**os.environ, "PYTHONPATH": "."}
    args = command.strip().split()
    assert args[:3] == ["PYTHONPATH=.", "python", "-m"]
    done = subprocess.run([sys.executable, *args[2:], "--trainer.enable_progress_bar=false"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "lightning_logs").glob("**/checkpoints/last.ckpt"))
    assert list((tmp_path / "lightning_logs").glob("**/adapter/adapter_config.json"))
