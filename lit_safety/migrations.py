"""Options that were renamed or moved: a config or command line that still uses one stops with one
line saying what to write instead, before anything is loaded."""

from __future__ import annotations

import importlib
import inspect
import re
import sys

import yaml

# old model option -> what to write instead
RENAMED = {
    "model": "base_model",
    "evaluation": "a top-level `evaluation:` key (beside model and data)",
    "scale": "margin_scale",
    "alpha": "benign_weight (triplet) or coefficient_scale (circuit breakers)",
    "beta": "harmful_weight",
    "gamma": "kl_weight",
    "seed": "mining_seed (triplet), init_seed (circuit breakers) or objective.init_args.direction_seed (LAT RMU)",
    "adversary_layers": "adversary.layers",
    "epsilon": "adversary.epsilon",
    "epsilon_scale": "adversary.epsilon_scale",
    "adversary_steps": "adversary.steps",
    "adversary_lr": "adversary.lr",
    "adversary_positions": "adversary.positions",
    "adversary_tokens": "adversary.tokens",
    "adversary_toward": "objective: {class_path: lit_safety.methods.lat_objectives.Refusal, init_args: {adversary_toward: ...}}",
    "adversary_away": "the Refusal objective's init_args.adversary_away",
    "model_toward": "the Refusal or DPO objective's init_args.model_toward",
    "model_away": "the Refusal objective's init_args.model_away",
    "benign_loss": "nothing (benign SFT is the objective's retain term; RMU keeps states)",
    "dpo_beta": "objective: {class_path: lit_safety.methods.lat_objectives.DPO, init_args: {beta: ...}}",
    "rmu_layer": "objective: {class_path: lit_safety.methods.lat_objectives.RMU, init_args: {layer: ...}}",
    "rmu_steering": "the RMU objective's init_args.steering",
    "rmu_positions": "the RMU objective's init_args.positions",
}
OBJECTIVES = {"refusal": "Refusal", "dpo": "DPO", "rmu": "RMU", "gradient_ascent": "GradientAscent"}
VALUES = {"layer_norm": "reference_norm"}


def _message(where: str, key: str, value=None) -> str:
    if key == "objective" and isinstance(value, str) and value in OBJECTIVES:
        return (f"{where}: `objective: {value}` is now a component: objective: {{class_path: "
                f"lit_safety.methods.lat_objectives.{OBJECTIVES[value]}}}")
    if isinstance(value, str) and value in VALUES:
        return f"{where}: the value {value!r} of {key} is now {VALUES[value]!r}"
    return f"{where}: option {key!r} was renamed or moved; write {RENAMED[key]}"


def current_options(class_path: str | None) -> set[str]:
    """The options the module ``class_path`` takes today (its and its bases' ``__init__``
    parameters): an old name one method dropped may be another's current option (ReFAT's ``seed``)."""
    if not class_path:
        return set()
    module_name, _, name = class_path.rpartition(".")
    module_name = module_name or "lit_safety"  # LightningCLI's short form names a class it exports
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return set()  # the CLI reports a class it cannot import
    return {p for c in getattr(cls, "__mro__", ()) if "__init__" in vars(c)
            for p in inspect.signature(c.__init__).parameters}


def _is_old(key: str, value, current: set[str] = frozenset()) -> bool:
    if key == "model" and not isinstance(value, str):
        return False
    if key == "objective" and isinstance(value, str):
        return True
    return (key in RENAMED and key not in current) or (isinstance(value, str) and value in VALUES)


def renamed_options(config: dict, where: str, class_path: str | None = None) -> list[str]:
    """Messages for every old option in a parsed config (its ``model`` section) or suite, for the
    module ``class_path`` (default: the config's own)."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("init_args", {}), dict):
        return []
    init = model.get("init_args", {})
    current = current_options(class_path or model.get("class_path"))
    return [_message(where, k, v) for k, v in init.items() if _is_old(k, v, current)]


def option_values(args: list[str], flag: str) -> list[tuple[int, str]]:
    """(index, value) of every ``flag VALUE`` or ``flag=VALUE`` in a command line; the index is the
    value's own token for the first form and the ``flag=`` token for the second."""
    found = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found.append((i + 1, args[i + 1]))
        elif arg.startswith(f"{flag}="):
            found.append((i, arg.partition("=")[2]))
    return found


def check_renamed_options(args: list[str] | None) -> None:
    """Exit with one line per old option found in ``--config`` files or ``--model.X`` arguments."""
    args = sys.argv[1:] if args is None else args
    configs, class_path = [], None
    for _, path in option_values(args, "--config"):
        try:
            with open(path) as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            continue  # the CLI itself reports files it cannot read
        configs.append((path, config))
        model = config.get("model") if isinstance(config, dict) else None
        class_path = model.get("class_path", class_path) if isinstance(model, dict) else class_path
    for _, value in option_values(args, "--model") + option_values(args, "--model.class_path"):
        class_path = value
    # every file and argument is read against the module the whole command builds
    messages = [m for path, config in configs for m in renamed_options(config, path, class_path)]
    current = current_options(class_path)
    for arg in args:
        match = re.fullmatch(r"--model\.(?:init_args\.)?(\w+)(?:=(.*))?", arg)
        if match and _is_old(match[1], match[2] if match[2] is not None else {}, current):
            messages.append(_message(arg, match[1], match[2]))
    if messages:
        sys.exit("\n".join(f"error: {m}" for m in messages))
