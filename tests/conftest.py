"""Shared fixtures: a tiny Llama with a word-level tokenizer saved to disk, and small data files."""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("LIT_SAFETY_ORGANISM_RECIPE", "tiny")  # seconds to build; tests check machinery
os.environ.setdefault("LIT_SAFETY_QUIET", "1")

WORDS = "make sell study avoid poison bomb apple river reverse copy ok : sorry i cannot help 1 2 3 4".split()
REFUSAL = "sorry i cannot help"


def tiny_llama(path, vocab_size: int, layers: int = 4, hidden: int = 16, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 4-layer Llama (hidden 16) and its chat tokenizer, saved like any Hugging Face model."""
    from lit_safety.organism.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tokenizer(WORDS)
    tokenizer.save_pretrained(path)
    tiny_llama(path, len(tokenizer))
    return str(path)


def _rows(kind: str, n: int):
    objects = {"harmful": ["poison", "bomb"], "benign": ["apple", "river"]}[kind]
    rows = []
    for i in range(n):
        a, b = str(1 + i % 4), str(1 + (i + 1) % 4)
        row = {"prompt": f"{['make', 'sell'][i % 2]} {objects[i % 2]} reverse {a} {b}", "kind": kind,
               "completion": f"ok : {b} {a}"}
        if kind == "harmful":
            row["refusal"] = REFUSAL
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, str]:
    """JSONL files of harmful (with refusals) and benign records in the standard schema."""
    path = tmp_path_factory.mktemp("data")
    files = {}
    for kind in ("harmful", "benign"):
        files[kind] = str(path / f"{kind}.jsonl")
        with open(files[kind], "w") as f:
            for row in _rows(kind, 12):
                f.write(json.dumps(row) + "\n")
    return files


def tiny_cli_args(tiny_model_dir: str, data_files: dict[str, str], root) -> list[str]:
    """CLI overrides that point any config at the tiny model and data, logging under ``root``."""
    return [
        f"--model.base_model={tiny_model_dir}",
        f"--data.streams={json.dumps({k: {'sources': [v], 'max_prompt_length': 16, 'max_completion_length': 8} for k, v in data_files.items()})}",
        "--data.batch_size=4",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture
def tiny_args(tiny_model_dir, data_files, tmp_path) -> list[str]:
    """``tiny_cli_args`` logging under tmp_path."""
    return tiny_cli_args(tiny_model_dir, data_files, tmp_path)


QUICK = {"steps": 3, "snapshots": 1, "k": 2, "checkpoints": [1, 2]}


def quick_suite_config(path) -> str:
    """configs/suite.yaml with every budget cut to a few steps: the same attacks through the same
    CLI path, at a cost a test affords (the shipped budgets run in the slow tests)."""
    import yaml

    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "suite.yaml")
    with open(shipped) as f:
        suite = yaml.safe_load(f)
    for attack in suite["init_args"]["attacks"]:
        args = attack.get("init_args", {})
        args.update({key: value for key, value in QUICK.items() if key in args})
    out = os.path.join(path, "quick_suite.yaml")
    with open(out, "w") as f:
        yaml.safe_dump(suite, f)
    return out


@pytest.fixture(scope="session")
def quick_suite(tmp_path_factory) -> str:
    return quick_suite_config(tmp_path_factory.mktemp("suite"))
