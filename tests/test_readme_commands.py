"""Every `python -m lit_safety ...` command of README.md runs as written (the SmolLM2 ones need its
package and are skipped; benchmarks have their own smoke tests). The CI smoke runs them with a few
steps and behaviours on the tiny organism; the slow test runs them exactly as written on the full one."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMOKE = {"fit": ["--trainer.max_steps=2"], "test": ["--data.test_size=2"], "report": ["--n", "2"]}


def readme_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m lit_safety") and "smollm2" not in line:
                commands.append(shlex.split(line))
    return commands


def run_all(tmp_path, env: dict, smoke: bool) -> None:
    from conftest import quick_suite_config

    os.symlink(os.path.abspath(os.path.join(ROOT, "configs")), tmp_path / "configs")
    quick = ["--evaluation", quick_suite_config(tmp_path)]  # the shipped attacks at a few steps each
    for command in readme_commands():
        extra = []
        if smoke and not any(a.endswith("help") or a == "--print_config" for a in command):
            extra = next((v for k, v in SMOKE.items() if k in command[3:5]), [])
            extra = extra + quick if command[3:4] == ["test"] else extra
        done = subprocess.run([sys.executable, *command[1:], *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=3600)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-3000:]}"


def test_readme_lists_the_commands_a_user_runs():
    commands = [" ".join(c[:5]) for c in readme_commands()]
    assert "python -m lit_safety fit --config" in commands
    assert any("--ckpt_path" in " ".join(c) for c in readme_commands())  # resume and test from a checkpoint
    assert "python -m lit_safety test --config" in commands
    assert "python -m lit_safety.organism report" in " ".join(commands)


def test_readme_commands_smoke_on_the_tiny_organism(tmp_path):
    run_all(tmp_path, {**os.environ, "LIT_SAFETY_ORGANISM_RECIPE": "tiny"}, smoke=True)


@pytest.mark.slow
def test_readme_commands_as_written_on_the_full_organism(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LIT_SAFETY_ORGANISM_RECIPE"}
    run_all(tmp_path, env, smoke=False)
