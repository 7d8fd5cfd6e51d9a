"""The command line: ``python -m lit_safety {fit,validate,test} --config configs/X.yaml``.

Model and data are chosen by class path (``--model lit_safety.TripletDefenseModule``); every init
argument is a typed, documented option (``--model.help CLASS``). The data module defaults to the
organism's streams, the logger to TensorBoard, the seed to 0. ``evaluation`` (top level) is the attack
suite that ``test`` runs, a ``lit_safety.evaluation.SafetyEvaluation`` callback. Bad input stops with
one line naming the option, file or value (``LIT_SAFETY_TRACEBACK=1`` shows the whole traceback).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings

import torch
import yaml
from jsonargparse import ArgumentError, lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_safety import artifacts
from lit_safety.data import SafetyDataModule
from lit_safety.evaluation import SafetyEvaluation
from lit_safety.methods import SafetyModule
from lit_safety.migrations import check_renamed_options, option_values
from lit_safety.progress import RunProgress

TRACEBACK = "LIT_SAFETY_TRACEBACK"
_NOISE = ("Does not validate against any of the", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
          "Given value type:", "Given value:")


def one_line(message: str) -> str:
    """The lines of a parser error that say what is wrong, joined: jsonargparse lists every member
    of a union type it tried, which buries the one that names the problem."""
    lines = [line.strip(" -") for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(_NOISE)]
    return " ".join(kept).split(" Given value:")[0]


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet() -> None:
    """No advertisement tips, and no deprecation warnings raised inside the libraries we call."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):  # main() may run many times in a process
        rank_zero.addFilter(_NoTips())
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it cannot find
    for module in ("transformers", "lightning", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" on every model load


def _fp32_without_native_bf16(config: dict) -> None:
    """bf16 precision on a CPU whose bf16 matmuls are slower than fp32 ones (no native kernels) trains
    in fp32 instead, and says so; where bf16 is faster (GPUs, CPUs with AMX) it is kept."""
    from lit_safety import backbone

    precision, accelerator = str(config.get("precision")), config.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if precision.startswith("bf16") and on_cpu and (speedup := backbone.bf16_speedup("cpu")) < 1.0:
        config["precision"] = "32-true"
        print(f"precision {precision} -> 32-true: bf16 matmuls run {1 / speedup:.1f}x slower than fp32 on this CPU",
              flush=True)


class LitSafetyCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        # A resumed run continues in the run directory of its checkpoint, not in a new version.
        config = self.config.get(self.subcommand) if self.subcommand else None
        ckpt = config.get("ckpt_path") if config is not None else None
        logger = config.get("trainer", {}).get("logger") if ckpt else None
        checkpoints = os.path.dirname(os.path.abspath(ckpt)) if ckpt else ""
        if self.subcommand != "fit" or os.path.basename(checkpoints) != "checkpoints" or \
                not hasattr(logger, "init_args") or "TensorBoardLogger" not in str(logger.class_path):
            return
        run = os.path.dirname(checkpoints)
        logger.init_args.save_dir = os.path.dirname(os.path.dirname(run))
        logger.init_args.name = os.path.basename(os.path.dirname(run))
        logger.init_args.version = os.path.basename(run)
        print(f"resuming in {run}", flush=True)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        _fp32_without_native_bf16(config)
        # A run-level progress bar (log lines when stdout is not a terminal) and the learning rate.
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in
                                                                        [*callbacks, *(config.get("callbacks") or [])]):
            callbacks.append(RunProgress())
        if config.get("logger") not in (False, None) or "logger" not in config:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SafetyEvaluation, "evaluation", subclass_mode=True, required=False)
        parser.set_defaults({"data": lazy_instance(SafetyDataModule), "evaluation": lazy_instance(SafetyEvaluation)})

    def before_fit(self) -> None:
        # `checkpoints/last.ckpt` is the one path to resume or evaluate from, whatever the schedule.
        if self.trainer.checkpoint_callback is not None:
            self.trainer.checkpoint_callback.save_last = True
        try:  # the optimizer checks its own settings (a negative learning rate...) before any model loads
            self.model.optimizer([torch.nn.Parameter(torch.zeros(1))])
        except ValueError as e:
            raise ValueError(f"model.optimizer: {e}") from None

    def before_test(self) -> None:
        # Attack settings that depend on the model's layers fail here, before the model is loaded.
        from lit_safety import backbone

        base = getattr(self.model, "hparams", {}).get("base_model")
        num_layers = backbone.num_decoder_layers(base) if base else None
        if num_layers is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, SafetyEvaluation):
                    callback.check_layers(num_layers)

    def after_fit(self) -> None:
        # The last steps are in last.ckpt even when max_steps is not a multiple of the checkpoint
        # interval (Lightning saves at validation and epoch ends only).
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.dirpath and self.trainer.global_step > 0:
            self.trainer.save_checkpoint(os.path.join(callback.dirpath, "last.ckpt"))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_run_directory()
            raise

    def _remove_empty_run_directory(self) -> None:
        """A run that failed before its first step leaves no run directory behind (only its config and
        an empty event file would be in it)."""
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if not log_dir or not os.path.isdir(log_dir) or self.trainer.global_step > 0:
            return
        if not {"checkpoints", "adapter", "eval_results.json"} & set(os.listdir(log_dir)):
            shutil.rmtree(log_dir, ignore_errors=True)
            parent = os.path.dirname(log_dir)
            if os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FRAGMENTS = ("evaluation", "data")  # top-level keys whose value may name another config file


def resolve_fragments(args: list[str]) -> list[str]:
    """Config fragments (``evaluation: suite.yaml``, ``data: smollm2/data.yaml``) resolve relative to
    the config that names them, else among the shipped configs, so a shipped config copied anywhere
    still runs. A config that needs the shipped ones is passed on with their absolute paths."""
    out = list(args)
    for i, path in option_values(args, "--config"):
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            config = yaml.safe_load(f)
        if not isinstance(config, dict):
            continue
        changed = False
        for key in FRAGMENTS:
            value = config.get(key)
            found = fragment_path(path, value)
            if found is not None and not os.path.isabs(value):
                config[key] = found
                changed |= found == os.path.join(SHIPPED, value)
        if changed:  # every fragment file is now absolute, so the config may be read from a string
            text = yaml.safe_dump(config)
            out[i] = text if out[i] == path else f"--config={text}"
    return out


def fragment_path(config: str, value: object) -> str | None:
    """The file a fragment of ``config`` names (``evaluation: suite.yaml``): beside that config, else among
    the shipped configs; None if ``value`` names no config file."""
    if not (isinstance(value, str) and value.endswith((".yaml", ".yml"))):
        return None
    local, shipped = os.path.join(os.path.dirname(os.path.abspath(config)), value), os.path.join(SHIPPED, value)
    return local if os.path.isfile(local) or not os.path.isfile(shipped) else shipped


def check_checkpoint_path(args: list[str]) -> None:
    """A ``--ckpt_path`` that is not a lit_safety checkpoint stops here, with one line naming the file
    (Lightning would unpickle it while parsing)."""
    for _, path in option_values(args, "--ckpt_path"):
        if path and path not in ("last", "best", "hpc", "registry"):
            artifacts.read_checkpoint(path)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI; ``args`` defaults to ``sys.argv`` (tests pass a list)."""
    check_renamed_options(args)
    quiet()
    try:
        args = resolve_fragments(sys.argv[1:] if args is None else args)
        check_checkpoint_path(args)
        return LitSafetyCLI(
            model_class=SafetyModule,
            datamodule_class=SafetyDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="lightning_logs", default_hp_metric=False)},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            parser_kwargs={"exit_on_error": False},
        )
    except ArgumentError as e:
        if os.environ.get(TRACEBACK) == "1":
            raise
        sys.exit(f"error: {one_line(str(e))}\n(`--help` lists the options; set {TRACEBACK}=1 for the traceback)")
    except (ValueError, FileNotFoundError) as e:  # lit_safety's DataError, BackboneError, ArtifactError...
        if os.environ.get(TRACEBACK) == "1":
            raise
        sys.exit(f"error: {one_line(str(e))}\n(set {TRACEBACK}=1 for the traceback)")
