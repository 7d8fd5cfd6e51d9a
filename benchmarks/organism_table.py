"""The organism benchmark: every method trained on the same organism and data, then attacked with the
same suite (configs/suite.yaml). Writes benchmarks/results/organism_table.{json,md,png}.

    python benchmarks/organism_table.py                  # one seed, 50 behaviours per split
    python benchmarks/organism_table.py --seeds 3 --n 100
    python benchmarks/organism_table.py --keep-checkpoints   # re-attack the models already trained in --work
    python benchmarks/organism_table.py --first-seed 1 --seeds 1   # seed 1 alone (e.g. beside another run)

Each method is one training config; "base" is the aligned organism with fresh adapters. Seeds vary
the adapter initialisation and the data order. The methods of one seed run side by side, ``--jobs``
at a time with the cores split between them (on 2 cores, two single-threaded runs finish the table
sooner than one run on two threads: the organism's matrices are too small to keep two threads busy);
the wall time of each seed's whole table is reported. Figures are means over seeds with their spread
(min-max), and every ASR cell keeps its per-seed values and Wilson intervals in the JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import os
import shutil
import sys
import time

import yaml

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, WORST_CASES, atomic_write, organism_builds, run, spread, spread_cell
from lit_safety.cache import weights_checksum
from lit_safety.cli import FRAGMENTS, fragment_path
from lit_safety.organism import model_dir
from lit_safety.organism.builder import current_recipe

METHODS = {
    "base": None,
    "refusal_sft": "configs/refusal_sft.yaml",
    "circuit_breaker": "configs/circuit_breaker.yaml",
    "lat": "configs/lat.yaml",
    "triplet": "configs/triplet.yaml",
    "triplet_adv": "configs/triplet_adv.yaml",
    "refat": "configs/refat.yaml",
    "triplet_latent": "configs/triplet_latent.yaml",
    "triplet_suffix": "configs/triplet_suffix.yaml",
    "triplet_latent_suffix": "configs/triplet_latent_suffix.yaml",
    "triplet_lat": "configs/triplet_lat.yaml",
    "lat_embedding": "configs/lat_embedding.yaml",
    "lat_suffix": "configs/lat_suffix.yaml",
    "triplet_suffix_refusal": "configs/triplet_suffix_refusal.yaml",
    "triplet_suffix_refusal_lengths": "configs/triplet_suffix_refusal_lengths.yaml",
}
EVALUATE = "configs/evaluate.yaml"  # the untrained base's test config
SPLITS = ["train", "heldout_synonym", "heldout_concept", "format_b", "format_c"]


def result_path(work: str, name: str, seed: int) -> str:
    return os.path.join(work, f"{name}_seed{seed}_result.json")


def saved_result(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def reusable(result: dict | None, n: int, setting: str) -> bool:
    """Whether a saved result is a finished one measured with ``n`` behaviours per split on the organism
    as built now, of ``setting`` (``setting_key``): a file that only carries a training time is not; a run
    on an earlier build, or of a config edited since, is measured again rather than mixed with this one's."""
    return (result is not None and result.get("n") == n and result.get("setting") == setting
            and (result.get("base_model") or {}).get("sha256") == organism_build())


def setting_key(config: str | None, extra: tuple[str, ...]) -> str:
    """What a run is asked to do, as a checksum: its config (``configs/evaluate.yaml`` for the untrained
    base) as parsed values, with the config files it names (its attack suite) read in place and the
    ``--a.b=value`` options added set in it. Comments and layout do not count, and an option written in
    the config or given on the command line is the same setting."""
    path = os.path.join(ROOT, config or EVALUATE)
    setting = load_yaml(path)
    for key in FRAGMENTS:
        fragment = fragment_path(path, setting.get(key))
        if fragment:
            setting[key] = load_yaml(fragment)
    unparsed = []
    for option in extra:
        dotted, equals, value = option.removeprefix("--").partition("=")
        if option.startswith("--") and equals:
            set_dotted(setting, dotted.split("."), yaml.safe_load(value))
        else:
            unparsed.append(option)
    text = json.dumps([setting, unparsed], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def set_dotted(config: dict, keys: list[str], value) -> None:
    """``config[k1][k2]... = value``; a component's option may be written without ``init_args``
    (``model.lr`` is ``model.init_args.lr``), as the CLI reads it."""
    node = config
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        following = keys[i + 1]
        if isinstance(node, dict) and "class_path" in node and following not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
    node[keys[-1]] = value


def organism_build() -> str:
    """The checksum of the organism's weights as the current recipe builds them."""
    return _build_checksum(current_recipe().key)


@functools.lru_cache
def _build_checksum(recipe: str) -> str:  # one hash per recipe key: reuse checks call this per run
    return weights_checksum(model_dir())


def evaluate_method(name: str, config: str | None, seed: int, n: int, work: str, reuse: bool = False,
                    threads: int | None = None, extra: tuple[str, ...] = (), keep_checkpoints: bool = False) -> dict:
    os.makedirs(work, exist_ok=True)
    saved = result_path(work, name, seed)
    previous = saved_result(saved)
    setting = setting_key(config, extra)
    if reuse and reusable(previous, n, setting):
        return previous
    logger = ["--trainer.logger.init_args.save_dir", work, "--trainer.enable_progress_bar=false"]
    train_seconds = 0.0
    checkpoint = os.path.join(work, name, f"seed{seed}", "checkpoints", "last.ckpt")
    # the fit's time is kept beside its checkpoint: a run whose test was interrupted is tested again
    # from the checkpoint and still reports what training cost
    timing = os.path.join(work, name, f"seed{seed}", "train_seconds.json")
    test = ["test", "--config", config or EVALUATE, f"--data.init_args.test_size={n}", *logger,
            "--trainer.logger.init_args.name", f"{name}_test", "--trainer.logger.init_args.version", f"seed{seed}",
            *extra]
    if config is not None and keep_checkpoints and os.path.isfile(checkpoint):
        # checkpoints trained before times were kept beside them: their earlier result's
        train_seconds = (saved_result(timing) or previous or {}).get("train_seconds")
        test += ["--ckpt_path", checkpoint]
    elif config is not None:
        shutil.rmtree(os.path.join(work, name, f"seed{seed}"), ignore_errors=True)  # no stale checkpoints
        train_seconds = run(["fit", "--config", config, "--seed_everything", str(seed), f"--data.init_args.seed={seed}",
                             *logger, "--trainer.logger.init_args.name", name,
                             "--trainer.logger.init_args.version", f"seed{seed}", *extra],
                            os.path.join(work, f"{name}_seed{seed}_fit.log"), threads)
        atomic_write(timing, json.dumps({"train_seconds": train_seconds}))
        test += ["--ckpt_path", checkpoint]
    eval_seconds = run(test, os.path.join(work, f"{name}_seed{seed}_test.log"), threads)
    with open(os.path.join(work, f"{name}_test", f"seed{seed}", "eval_results.json")) as f:
        results = {**json.load(f), "train_seconds": train_seconds, "eval_seconds": eval_seconds, "n": n,
                   "setting": setting}
    atomic_write(saved, json.dumps(results))
    return results


def aggregate(per_seed: dict[str, list[dict]]) -> dict:
    table = {}
    for method, runs in per_seed.items():
        first = runs[0]
        row = {"asr": {}, "gibberish": {}}
        for attack, splits in first["asr"].items():
            for split in splits:
                row["asr"].setdefault(attack, {})[split] = {
                    **spread([r["asr"][attack][split]["rate"] for r in runs]),
                    "intervals": [[r["asr"][attack][split]["low"], r["asr"][attack][split]["high"]] for r in runs],
                    "n": first["asr"][attack][split]["n"],
                }
                row["gibberish"].setdefault(attack, {})[split] = spread([r["gibberish"][attack][split] for r in runs])
        for attack, splits in first.get("asr_strict", {}).items():
            for split in splits:
                row.setdefault("asr_strict", {}).setdefault(attack, {})[split] = spread(
                    [r["asr_strict"][attack][split]["rate"] for r in runs])
        for attack, splits in first.get("curves", {}).items():
            for split, curve in splits.items():
                row.setdefault("curves", {}).setdefault(attack, {})[split] = {
                    budget: spread([r["curves"][attack][split][budget]["rate"] for r in runs]) for budget in curve}
        row["attack_seconds"] = {a: spread([r["attack_seconds"][a] for r in runs]) for a in first["attack_seconds"]}
        row["benign_accuracy"] = {k: spread([r["benign_accuracy"][k] for r in runs]) for k in first["benign_accuracy"]}
        row["benign_kl"] = {k: spread([r["benign_kl"][k] for r in runs]) for k in first["benign_kl"]}
        row["over_refusal"] = {k: spread([r["over_refusal"][k] for r in runs]) for k in first["over_refusal"]}
        row["train_seconds"] = spread([r["train_seconds"] or 0.0 for r in runs])
        row["eval_seconds"] = spread([r["eval_seconds"] for r in runs])
        row["organism_builds"] = organism_builds(runs)
        table[method] = row
    return table


def table_attacks(table: dict) -> list[str]:
    """Every attack (and worst case) of any row, in order: rows may predate an attack."""
    return list(dict.fromkeys(a for row in table.values() for a in row["asr"]))


def markdown(table: dict, budgets: dict, seeds: int, n: int, seed_seconds: list[float | None], jobs: int) -> str:
    attacks = table_attacks(table)
    builds = sorted({b for row in table.values() for b in row.get("organism_builds", [])})
    lines = [f"ASR (exact judge) per attack and split; {n} behaviours per split, {seeds} seed(s), mean (min-max)"
             + (f"; organism build {', '.join(builds)} (checksum of its weights)." if builds else "."), ""]
    for attack in attacks:
        lines += [f"**{attack}**", "", "| method | " + " | ".join(SPLITS) + " |", "|---" * (len(SPLITS) + 1) + "|"]
        for method, row in table.items():
            lines.append(f"| {method} | " + " | ".join(spread_cell(row["asr"].get(attack, {}).get(s)) for s in SPLITS) + " |")
        lines.append("")
    lines += ["**worst case, strict reading** (the answer and nothing after it)", "",
              "| method | " + " | ".join(SPLITS) + " |", "|---" * (len(SPLITS) + 1) + "|"]
    for method, row in table.items():
        strict = row.get("asr_strict", {})
        worst = {s: max((strict[a][s]["mean"] for a in strict if s in strict[a]), default=None) for s in SPLITS}
        lines.append(f"| {method} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in worst.values()) + " |")
    lines += ["", "(the strict worst case where the results have it, else the largest single attack's strict ASR, "
              "a lower bound on it)", ""]
    for attack in sorted({a for row in table.values() for a in row.get("curves", {})}):
        splits = [s for s in SPLITS if any(s in row.get("curves", {}).get(attack, {}) for row in table.values())]
        lines += [f"**{attack}: ASR by budget** ({', '.join(splits)})", ""]
        points = next(list(row["curves"][attack][splits[0]]) for row in table.values() if attack in row.get("curves", {}))
        lines += ["| method | split | " + " | ".join(str(b) for b in points) + " |", "|---" * (len(points) + 2) + "|"]
        for method, row in table.items():
            for split in splits:
                curve = row.get("curves", {}).get(attack, {}).get(split)
                if curve:
                    lines.append(f"| {method} | {split} | " + " | ".join(spread_cell(curve[b]) for b in points) + " |")
        lines.append("")
    timed = [a for a in attacks if a not in WORST_CASES]
    lines += ["**seconds per attack** (all splits, mean over seeds)", "",
              "| method | " + " | ".join(timed) + " |", "|---" * (len(timed) + 1) + "|"]
    for method, row in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{row['attack_seconds'][a]['mean']:.0f}" if a in row["attack_seconds"]
                                                   else "—" for a in timed) + " |")
    lines.append("")
    lines += ["**capability and cost**", "",
              "| method | benign acc. A | B | C | benign KL (A) | borderline over-refusal | borderline acc. | "
              "gibberish (prefill, train) | train s | eval s |", "|---" * 10 + "|"]
    for method, row in table.items():
        acc = row["benign_accuracy"]
        lines.append(
            f"| {method} | {spread_cell(acc['A'])} | {spread_cell(acc['B'])} | {spread_cell(acc['C'])} | {row['benign_kl']['A']['mean']:.4f} | "
            f"{spread_cell(row['over_refusal']['borderline'])} | {spread_cell(acc['borderline'])} | "
            f"{spread_cell(row['gibberish']['prefill']['train'])} | {row['train_seconds']['mean']:.0f} | {row['eval_seconds']['mean']:.0f} |")
    walls = ", ".join("n/a" if s is None else f"{s / 60:.1f}" for s in seed_seconds)
    side = ("; train s and eval s are each method's own wall times, measured while another method ran"
            if jobs > 1 else "")
    lines += ["", f"Wall time of the whole table per seed: {walls} min ({jobs} method(s) at a time{side}).",
              "", "Attack budgets (configs/suite.yaml):", "", "```json", json.dumps(budgets, indent=1), "```", ""]
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = table_attacks(table)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.6), sharey=True)
    width = 0.8 / len(table)
    for ax, attack in zip(axes, attacks):
        for i, (method, row) in enumerate(table.items()):
            cells = [row["asr"].get(attack, {}).get(s) for s in SPLITS]
            means = [c["mean"] if c else float("nan") for c in cells]  # no bar where the attack did not run
            spread = [[max(c["mean"] - c["min"], 0.0) if c else 0.0 for c in cells],
                      [max(c["max"] - c["mean"], 0.0) if c else 0.0 for c in cells]]
            seeds = len(row["train_seconds"]["values"])  # every row has it, whichever splits an attack ran on
            ax.bar([j + i * width for j in range(len(SPLITS))], means, width, label=method,
                   yerr=spread if seeds > 1 else None, error_kw={"elinewidth": 0.6, "capsize": 1})
        ax.set_title(attack)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SPLITS))], SPLITS, rotation=45, ha="right", fontsize=7)
    axes[0].set_ylabel("ASR (exact judge; bars: min-max over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(table), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(table: dict, path: str, split: str = "heldout_synonym") -> None:
    """One panel per budgeted attack: each method's ASR on ``split`` against the budget (mean over
    seeds, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for row in table.values() for a in row.get("curves", {}) if split in row["curves"][a]})
    if not attacks:
        return
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.4 * len(attacks), 3.4), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for method, row in table.items():
            curve = row.get("curves", {}).get(attack, {}).get(split)
            if not curve:
                continue
            budgets = [int(b) for b in curve]
            ax.plot(budgets, [c["mean"] for c in curve.values()], marker="o", label=method)
            ax.fill_between(budgets, [c["min"] for c in curve.values()], [c["max"] for c in curve.values()], alpha=0.12)
        ax.set_xscale("log")
        ax.set_title(attack)
        ax.set_xlabel("budget (steps; samples)")
    axes[0][0].set_ylabel(f"ASR on {split} (exact judge)")
    axes[0][0].set_ylim(0, 1.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(table), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (default 0): two runs of one --work can measure different seeds side "
                             "by side, and a third with --reuse and every seed puts them in one table")
    parser.add_argument("--n", type=int, default=50, help="behaviours per split (default 50)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "results", "runs"),
                        help="log directories of every run (not committed)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished (method, seed) results found in --work instead of re-running them")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="test the trained checkpoints found in --work instead of training again")
    parser.add_argument("--jobs", type=int, default=2,
                        help="methods trained and attacked side by side, each with cores/jobs threads (default 2)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="options appended to every fit and test command (e.g. --trainer.max_steps=2)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    per_seed: dict[str, list[dict]] = {}
    seed_seconds: list[float | None] = []
    # Trained methods first: the untrained base is the shortest job and fills the last gap.
    order = sorted(args.methods, key=lambda m: METHODS[m] is None)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        wall = os.path.join(args.work, f"seed{seed}_wall.json")
        reused = [m for m in args.methods if args.reuse and reusable(
            saved_result(result_path(args.work, m, seed)), args.n, setting_key(METHODS[m], tuple(args.extra)))]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {m: pool.submit(evaluate_method, m, METHODS[m], seed, args.n, args.work, args.reuse, threads,
                                          tuple(args.extra), args.keep_checkpoints)
                       for m in order}
            results = {m: futures[m].result() for m in args.methods}
        if not reused:
            seed_seconds.append(time.perf_counter() - start)
            atomic_write(wall, json.dumps({"seconds": seed_seconds[-1], "jobs": args.jobs, "methods": args.methods}))
        elif len(reused) == len(args.methods) and os.path.isfile(wall):
            with open(wall) as f:
                saved = json.load(f)
            # the time of the run that produced these results, if it ran these methods and nothing else
            seed_seconds.append(saved["seconds"] if saved["methods"] == args.methods else None)
        else:
            seed_seconds.append(None)  # partly reused: no whole-table time
        for method, result in results.items():
            if result["n"] != args.n:
                raise SystemExit(f"{method} seed {seed} in {args.work} was measured with n={result['n']}, not {args.n}")
            per_seed.setdefault(method, []).append(result)
            print(f"seed {seed} {method}: train {result['train_seconds'] or 0:.0f} s, eval {result['eval_seconds']:.0f} s",
                  flush=True)
        if seed_seconds[-1] is not None:
            print(f"seed {seed}: the whole table in {seed_seconds[-1]:.0f} s ({args.jobs} jobs)", flush=True)
    table = aggregate(per_seed)
    budgets = next(iter(per_seed.values()))[0]["budgets"]
    out = {"seeds": args.seeds, "n": args.n, "jobs": args.jobs, "seed_wall_seconds": seed_seconds,
           "budgets": budgets, "methods": table}
    atomic_write(os.path.join(args.out, "organism_table.json"), json.dumps(out, indent=1))
    text = markdown(table, budgets, args.seeds, args.n, seed_seconds, args.jobs)
    atomic_write(os.path.join(args.out, "organism_table.md"), text)
    plot(table, os.path.join(args.out, "organism_table.png"))
    plot_curves(table, os.path.join(args.out, "organism_curves.png"))
    print(json.dumps({m: {"asr_embedding_heldout": r["asr"]["embedding"]["heldout_synonym"]["mean"],
                          "benign_accuracy_A": r["benign_accuracy"]["A"]["mean"]} for m, r in table.items()}))
    print(text)


if __name__ == "__main__":
    main()
