"""The command line: ``python -m lit_safety {fit,validate,test} --config configs/X.yaml``.

Model and data are chosen by class path (``--model lit_safety.TripletDefenseModule``); every init
argument is a typed, documented option (``--model.help CLASS``). The data module defaults to the
organism's streams, the logger to TensorBoard, the seed to 0. ``evaluation`` (top level) is the attack
suite that ``test`` runs, a ``lit_safety.evaluation.SafetyEvaluation`` callback.
"""

from __future__ import annotations

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_safety.data import SafetyDataModule
from lit_safety.evaluation import SafetyEvaluation
from lit_safety.methods import SafetyModule
from lit_safety.migrations import check_renamed_options


class LitSafetyCLI(LightningCLI):
    def before_fit(self) -> None:
        # `checkpoints/last.ckpt` is the one path to resume or evaluate from, whatever the schedule.
        if self.trainer.checkpoint_callback is not None:
            self.trainer.checkpoint_callback.save_last = True

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SafetyEvaluation, "evaluation", subclass_mode=True, required=False)
        parser.set_defaults({"data": lazy_instance(SafetyDataModule), "evaluation": lazy_instance(SafetyEvaluation)})


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI; ``args`` defaults to ``sys.argv`` (tests pass a list)."""
    check_renamed_options(args)
    return LitSafetyCLI(
        model_class=SafetyModule,
        datamodule_class=SafetyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": lazy_instance(TensorBoardLogger, save_dir="lightning_logs")},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
