import glob
import os

import pytest
import torch
import yaml

from lit_safety import backbone
from lit_safety.cli import main
from lit_safety.evaluation import SafetyEvaluation


def _is_run_config(path: str) -> bool:
    with open(path) as f:
        return "model" in (yaml.safe_load(f) or {})  # suite.yaml, data.yaml: fragments run configs include


CONFIGS = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "**", "*.yaml"),
                                      recursive=True) if _is_run_config(p))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.dirname(p) + "/.."))
def test_every_shipped_config_parses_against_its_class(config):
    # Paper-scale recipes are parsed in full; only their hardware is swapped for this CPU.
    cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]
    cli = main(["--config", config, *(cpu if "llama3_8b" in config else [])], run=False)
    assert cli.model.hparams["base_model"], "config must name a model"
    suite = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SafetyEvaluation))
    if "smollm2" in config:  # no ground truth: the proxy judge and a reduced suite
        assert suite.judge_name == "refusal_prefix"
        assert [a.name for a in suite.attacks] == ["direct", "prefill", "embedding"]
    elif "llama3_8b" not in config:  # every organism config's `test` runs the shared attack suite
        assert [a.name for a in suite.attacks] == ["direct", "prefill", "sampled", "embedding", "embedding_20", "gcg",
                                                   "latent", "ablation", "ablation_prefill", "tampering"]
    with open(config) as f:
        first = f.readline()
    assert first.startswith("#"), "every config opens with a comment showing how to run it"


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: lit_safety.RefusalSFTModule\n  init_args:\n    refusal_wieght: 2.0\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)], run=False)
    message = str(exit_info.value)
    assert len(message.splitlines()) <= 3 and "Option 'refusal_wieght' is not accepted" in message.splitlines()[0]


BAD_INPUT = {  # option -> what the one-line error must name
    "--model.margin_harmful=-1": "margin_harmful > 0",
    "--model.optimizer.init_args.lr=-0.1": "model.optimizer: Invalid learning rate",
    "--model.layers_benign=[7]": "model.layers_benign: layer 7 is out of range",
    "--data.streams={\"harmful\": {\"sources\": [\"/nope.jsonl\"]}}": "data file not found: /nope.jsonl",
}


BAD_ATTACKS = {  # an attack in the suite -> what the one-line error must name
    '{"class_path": "lit_safety.evaluation.EmbeddingAttack", "init_args": {"steps": 2, "snapshots": 5}}':
        "EmbeddingAttack.snapshots: 5 is not in 1..steps (2)",
    '{"class_path": "lit_safety.evaluation.SampledResponses", "init_args": {"k": 0}}': "SampledResponses.k: must be >= 1",
    '{"class_path": "lit_safety.evaluation.LatentAttack", "init_args": {"layers": [9]}}':
        "LatentAttack.layers: layer 9 is out of range",
    '{"class_path": "lit_safety.evaluation.HarmfulFineTuning", "init_args": {"pairs": "/no/pairs.jsonl"}}':
        "HarmfulFineTuning.pairs: file not found: /no/pairs.jsonl",
}


@pytest.mark.parametrize("attack", BAD_ATTACKS)
def test_an_inconsistent_attack_budget_stops_in_one_line_before_the_model_loads(attack, tmp_path, monkeypatch):
    from lit_safety import backbone

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the attack settings were checked")

    monkeypatch.setattr(backbone, "load_causal_lm", no_loading)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "evaluate.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", config, f"--evaluation.init_args.attacks=[{attack}]",
              "--evaluation.init_args.attack_splits={}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    lines = str(exit_info.value).splitlines()
    assert len(lines) <= 3 and BAD_ATTACKS[attack] in lines[0], lines


@pytest.mark.parametrize("option", BAD_INPUT)
def test_bad_input_stops_with_one_line_naming_it_and_leaves_no_run_directory(option, tiny_args, tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "triplet.yaml")
    args = [a for a in tiny_args if not a.startswith("--model.base_model")]  # layers of the organism
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, *args, option, "--trainer.max_steps=1"])
    lines = str(exit_info.value).splitlines()
    assert len(lines) <= 3 and BAD_INPUT[option] in lines[0], lines
    assert not list(tmp_path.glob("**/version_*")), "a failed run left a run directory"


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    junk = tmp_path / "model.ckpt"
    junk.write_text("not a checkpoint")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "triplet.yaml")
    with pytest.raises(SystemExit, match=r"model.ckpt is not a checkpoint"):
        main(["fit", "--config", config, "--ckpt_path", str(junk)], run=False)


def test_fit_fast_dev_run_and_adapter_only_checkpoint_resume(tiny_args, tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    cli = main(["fit", "--config", config, *tiny_args, "--trainer.max_steps=2", "--trainer.val_check_interval=1",
                "--trainer.limit_val_batches=1", "--data.val_fraction=0.25"])
    log_dir = cli.trainer.log_dir
    events = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert events and os.path.isfile(os.path.join(log_dir, "config.yaml"))
    assert os.path.isfile(os.path.join(log_dir, "adapter", "adapter_config.json"))
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert state["lit_safety_class"] == "lit_safety.methods.refusal_sft.RefusalSFTModule"
    trained = {k: v.clone() for k, v in cli.model.state_dict().items()}

    resumed = main(["fit", "--config", config, *tiny_args, "--trainer.max_steps=3", "--data.val_fraction=0.25",
                    "--ckpt_path", ckpt])
    assert resumed.trainer.global_step == 3
    assert resumed.trainer.log_dir == log_dir  # the resumed run continues in its run directory
    # max_steps 3 is not a multiple of the validation interval: last.ckpt still holds step 3.
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    # Resuming loaded the adapter weights, then trained one more step from them.
    assert any(not torch.equal(trained[k], v) for k, v in resumed.model.state_dict().items())


def test_one_method_trains_on_top_of_anothers_adapter(tiny_args, tmp_path):
    """Stages: a run's adapter directory is a base_model; the next method's reference is the first
    stage's trained model, and its own adapter loads back through the chain."""
    from lit_safety.artifacts import load_for_evaluation

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    first = main(["fit", "--config", os.path.join(configs, "refusal_sft.yaml"), *tiny_args, "--trainer.max_steps=3"])
    stage1 = os.path.join(first.trainer.log_dir, "adapter")
    second = main(["fit", "--config", os.path.join(configs, "circuit_breaker.yaml"), *tiny_args,
                   f"--model.base_model={stage1}", "--trainer.max_steps=2"])
    stage2 = os.path.join(second.trainer.log_dir, "adapter")
    ids = torch.randint(7, 25, (2, 6))
    first.model.eval(), second.model.eval()
    with backbone.reference(second.model.model):
        reference = second.model.model(ids).logits
    assert torch.allclose(reference, first.model.model(ids).logits, atol=1e-5)
    trained = second.model.model(ids).logits
    assert not torch.allclose(trained, reference, atol=1e-5)  # the second stage trained
    model, _ = load_for_evaluation(stage2)
    assert torch.allclose(model(ids).logits, trained, atol=1e-5)
    assert open(os.path.join(stage2, "README.md")).read().startswith(f"---\nbase_model: {stage1}\n")


def test_fast_dev_run(tiny_args):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    cli = main(["fit", "--config", config, *tiny_args, "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1


def test_stacked_configs_and_print_config(tiny_args, tmp_path, capsys):
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    refusal_weight: 3.5\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--config", str(extra), "--model.lora_rank=2", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["refusal_weight"] == 3.5
    assert printed["model"]["init_args"]["lora_rank"] == 2


def test_a_config_with_renamed_options_says_what_to_write(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: lit_safety.TargetedLATModule\n  init_args:\n    model: organism\n"
                   "    objective: rmu\n    adversary_steps: 4\n    epsilon_scale: layer_norm\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(old)], run=False)
    lines = str(exit_info.value).splitlines()
    assert len(lines) == 4, lines  # one line per old option
    assert any("write base_model" in line for line in lines)
    assert any("lit_safety.methods.lat_objectives.RMU" in line for line in lines)
    assert any("adversary.steps" in line for line in lines)
    assert all(str(old) in line for line in lines)
    with pytest.raises(SystemExit, match="coefficient_scale"):
        main(["fit", "--config", "configs/circuit_breaker.yaml", "--model.alpha=3"], run=False)


def test_every_cli_checkpoint_rebuilds_its_module(tiny_args, tmp_path):
    from lit_safety.artifacts import ArtifactError, load_module

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "lat_unlearn.yaml")
    cli = main(["fit", "--config", config, *tiny_args, "--trainer.max_steps=2", "--model.adversary.steps=1",
                "--model.objective.init_args.layer=1", "--model.adversary.layers=[0]", "--data.val_fraction=0"])
    checkpoint = os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")
    module = load_module(checkpoint)  # CLI checkpoints hold the config, class paths included
    assert type(module.objective).__name__ == "RMU" and module.objective.layer == 1
    assert torch.equal(module.calibration["rmu_control"], cli.model.calibration["rmu_control"].cpu())
    trained = cli.model.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in module.state_dict().items())
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="junk.ckpt is not a checkpoint"):
        load_module(str(junk))


def test_fit_logs_progress_lines_when_piped_and_training_signals_to_tensorboard(tiny_args, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_safety.progress import RunProgress

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    args = [a for a in tiny_args if a != "--trainer.enable_progress_bar=false"]
    cli = main(["fit", "--config", config, *args, "--trainer.max_steps=4", "--trainer.log_every_n_steps=1"])
    assert any(isinstance(c, RunProgress) for c in cli.trainer.callbacks)
    out = capsys.readouterr().out  # not a terminal: log lines, not a bar
    assert "step 4/4 | loss" in out and "left" in out
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/grad_norm", "train/tokens_per_second", "train/steps_per_second", "train/loss"} <= tags
    assert any(tag.startswith("lr-") for tag in tags), tags
    assert "hp_metric" not in tags


def test_progress_prints_a_line_every_interval_when_not_a_terminal(capsys):
    import lightning as L

    from lit_safety import RefusalSFTModule, SafetyDataModule
    from lit_safety.progress import RunProgress

    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[RunProgress(interval=0)], limit_val_batches=0)
    trainer.fit(RefusalSFTModule(), SafetyDataModule(batch_size=4, val_fraction=0.0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]


def test_every_way_to_point_at_a_trained_model_works(tiny_args, tmp_path, monkeypatch, quick_suite):
    """fit from a shipped config, then the fit checkpoint, the adapter directory (lit_safety and plain
    peft, offline) and `test`, which adds its results to the adapter's model card."""
    import json

    from peft import AutoPeftModelForCausalLM

    from lit_safety.artifacts import load_for_evaluation, load_module
    from lit_safety.organism.__main__ import main as organism_main

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    args = [a for a in tiny_args if not a.startswith(("--model.base_model", "--data.streams"))]  # the organism
    cli = main(["fit", "--config", config, *args, "--trainer.max_steps=3"])
    run = cli.trainer.log_dir
    checkpoint, adapter = os.path.join(run, "checkpoints", "last.ckpt"), os.path.join(run, "adapter")
    ids = torch.randint(7, 40, (2, 6))
    cli.model.eval()
    expected = cli.model.model(ids).logits
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in (checkpoint, adapter):
        model, _ = load_for_evaluation(spec)
        assert torch.allclose(model(ids).logits, expected, atol=1e-5), spec
    plain = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # the base is a local directory
    assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
    assert type(load_module(checkpoint)).__name__ == "RefusalSFTModule"
    card = open(os.path.join(adapter, "README.md")).read()
    assert card.startswith("---\nbase_model: organism\nlibrary_name: peft") and "- steps: 3" in card
    assert "## Evaluation" not in card
    for spec in (checkpoint, adapter):  # a report names the build the trained adapters sit on
        organism_main(["report", "--model", spec, "--n", "2", "--json", str(tmp_path / "report.json")])
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["asr"]["direct"]["train"]["n"] == 2
        assert report["base_model"] == backbone.model_identity("organism") and report["base_model"]["sha256"]
    main(["test", "--config", config, *args, "--ckpt_path", checkpoint, "--data.test_size=2",
          "--evaluation", quick_suite, "--evaluation.init_args.projector_layer=null"])
    card = open(os.path.join(adapter, "README.md")).read()
    assert "## Evaluation" in card and "| direct |" in card and "Budgets:" in card


@pytest.mark.parametrize("name", ["triplet.yaml", "smollm2/triplet.yaml", "llama3_8b/triplet_paper.yaml"])
def test_a_shipped_config_copied_anywhere_still_finds_its_fragments(name, tmp_path, monkeypatch):
    import shutil

    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "configs", name), tmp_path / "copied.yaml")
    monkeypatch.chdir(tmp_path)  # neither the config's directory nor the working one has the fragments
    cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"]
    cli = main(["--config", "copied.yaml", *(cpu if "llama3_8b" in name else [])], run=False)
    suite = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SafetyEvaluation))
    expected = {"triplet.yaml": "gcg", "smollm2/triplet.yaml": "embedding", "llama3_8b/triplet_paper.yaml": "prefill"}
    assert expected[name] in [a.name for a in suite.attacks]
    if name != "triplet.yaml":  # data: <fragment>
        assert cli.datamodule.streams["harmful"].sources


def test_a_users_own_fragment_still_resolves_relative_to_its_config(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "suite.yaml").write_text(
        "class_path: lit_safety.evaluation.SafetyEvaluation\ninit_args:\n  attacks:\n"
        "    - class_path: lit_safety.evaluation.PrefillAttack\n")
    (tmp_path / "mine" / "run.yaml").write_text("model:\n  class_path: lit_safety.RefusalSFTModule\n"
                                                "evaluation: suite.yaml\n")
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", "mine/run.yaml"], run=False)
    suite = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SafetyEvaluation))
    assert [a.name for a in suite.attacks] == ["prefill"]


def test_a_class_name_beside_a_shipped_fragment_stays_a_class_name(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("model:\n  class_path: lit_safety.RefusalSFTModule\n"
                                       "evaluation: lit_safety.evaluation.SafetyEvaluation\n"
                                       "data: smollm2/data.yaml\n")
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", "run.yaml"], run=False)
    assert any(isinstance(cb, SafetyEvaluation) for cb in cli.trainer.callbacks)
    assert cli.datamodule.streams["harmful"].sources == ["smollm2:harmful_train"]


def test_smollm2_harmbench_fragment_stacks_on_a_smollm2_config():
    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2")
    cli = main(["--config", os.path.join(shipped, "evaluate.yaml"), "--config",
                os.path.join(shipped, "harmbench.yaml")], run=False)
    assert cli.datamodule.test_splits == {"harmbench": ["smollm2:harmbench_test"], "overrefusal": ["overrefusal:all"]}
    suite = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SafetyEvaluation))
    assert suite.judge_name == "refusal_offline"
    assert [a.name for a in suite.attacks] == ["direct", "sampled", "embedding"]
    assert suite.attack_splits == {"embedding": ["harmbench"]}  # not the SmolLM2 suite's split names
    assert suite.fidelity is not None and cli.model.hparams.base_model == "smollm2"


@pytest.mark.parametrize("name", ["triplet_paper", "triplet_released", "circuit_breaker", "lat_jailbreak", "refat"])
def test_paper_recipes_run_on_one_node_or_more(name, monkeypatch):
    # One node as shipped; nodes.yaml stacked after it spans two, with the same global batch. (Parsed
    # on this CPU as on a GPU node: bf16 counts as fast.)
    from lit_safety import backbone

    monkeypatch.setattr(backbone, "bf16_speedup", lambda device_type: 2.0)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "llama3_8b")
    one = main(["--config", os.path.join(config, f"{name}.yaml"), "--trainer.accelerator=cpu"], run=False)
    two = main(["--config", os.path.join(config, f"{name}.yaml"), "--config", os.path.join(config, "nodes.yaml"),
                "--trainer.accelerator=cpu"], run=False)
    for cli, nodes in ((one, 1), (two, 2)):
        strategy = cli.trainer.strategy
        assert type(strategy).__name__ == "ModelParallelStrategy" and cli.trainer.num_nodes == nodes
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8 * nodes, 1)
        assert cli.trainer.precision == "bf16-mixed" and cli.model.hparams.gradient_checkpointing
    assert one.datamodule.global_batch_size == two.datamodule.global_batch_size == (32 if name == "lat_jailbreak" else 16)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_precision_falls_back_to_fp32_on_a_cpu_without_bf16_kernels(native, monkeypatch, capsys):
    from lit_safety import backbone

    monkeypatch.setattr(backbone, "bf16_speedup", lambda device_type: 2.0 if native else 0.3)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "refusal_sft.yaml")
    cli = main(["--config", config, "--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed"], run=False)
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert ("bf16 matmuls run 3.3x slower than fp32" in capsys.readouterr().out) != native


def test_lat_suffix_adversary_options_of_the_readme_reach_the_module_and_misuse_is_one_line():
    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    cli = main(["--config", os.path.join(configs, "lat_suffix.yaml"), "--model.init_args.adversary.prompt_layers=[2]",
                "--model.init_args.adversary.prompt_epsilon=0.3", "--model.init_args.adversary.decoys=adversarial"],
               run=False)
    adversary = cli.model.adversary
    assert (adversary.prompt_layers, adversary.prompt_epsilon, adversary.decoys) == ([2], 0.3, "adversarial")
    assert adversary.sites == ["embedding", 2]
    with pytest.raises(SystemExit) as exit_info:  # lat.yaml's adversary perturbs the prompt: no slots to fill
        main(["--config", os.path.join(configs, "lat.yaml"), "--model.init_args.adversary.decoys=adversarial"],
             run=False)
    lines = str(exit_info.value).splitlines()
    assert len(lines) <= 3 and "decoys: adversarial needs positions: suffix" in lines[0], lines


def test_an_old_name_that_is_a_current_option_of_the_module_is_not_refused(tiny_args, tmp_path):
    from lit_safety.artifacts import load_module

    (tmp_path / "seed.yaml").write_text("model:\n  init_args:\n    seed: 1\n")  # an override file: no class_path
    # `seed` was renamed for the triplet, circuit breakers and LAT, but is ReFAT's own option
    with pytest.raises(SystemExit, match="mining_seed"):
        main(["fit", "--config", "configs/triplet.yaml", "--model.init_args.seed=1"], run=False)
    with pytest.raises(SystemExit, match="mining_seed"):
        main(["fit", "--config", "configs/triplet.yaml", "--config", str(tmp_path / "seed.yaml")], run=False)
    cli = main(["fit", "--config", "configs/refat.yaml", "--config", str(tmp_path / "seed.yaml"), *tiny_args,
                "--model.init_args.seed=1", "--trainer.max_steps=1", "--data.val_fraction=0"])
    module = load_module(os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"))
    assert type(module).__name__ == "RefusalFeatureATModule" and module.hparams.seed == 1
