"""Screen a training setting before the full suite: the setting (a config and its overrides) is trained
on the organism and attacked with configs/screen.yaml (direct requests, the embedding attack toward the
whole answer and the latent attack, at the suite's budgets) on the training and held-out splits, beside
benign accuracy per format. Adds its row to benchmarks/results/screens.{json,md} (a setting measured
again replaces its row).

    python benchmarks/screen.py lat_suffix configs/lat_suffix.yaml
    python benchmarks/screen.py refusal configs/triplet_latent_suffix.yaml --model.init_args.refusal_weight=1.0

A screen is one seed and no GCG, prefill, sampling or tampering: a setting that looks robust here goes
on to benchmarks/organism_table.py, whose worst case is over the whole suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, atomic_write
from benchmarks.organism_table import evaluate_method

HARMFUL = ("train", "heldout_synonym", "heldout_concept")
UNSCREENED = ("format_b", "format_c", "trigger")  # harmful splits of the default evaluation a screen skips
BUDGETS = ("300", "1000")


def row(result: dict) -> dict:
    """What the screen reports of one run: ASR per attack and split (with Wilson intervals), the
    embedding attack at each of BUDGETS steps, benign accuracy per format, borderline accuracy and
    over-refusal (on training words, and accuracy on held-out ones), and the training time."""
    curves = result["curves"]["embedding"]
    return {"asr": {attack: {s: splits[s] for s in HARMFUL if s in splits} for attack, splits in result["asr"].items()},
            "embedding": {s: {b: curves[s][b]["rate"] for b in BUDGETS if b in curves[s]}  # absent: stopped short
                          for s in HARMFUL},
            "benign_accuracy": {f: result["benign_accuracy"][f] for f in "ABC"},
            "borderline": {"accuracy": result["benign_accuracy"]["borderline"],
                           "over_refusal": result["over_refusal"]["borderline"],
                           "heldout_accuracy": result["benign_accuracy"]["borderline_heldout"]},
            "train_seconds": result["train_seconds"],
            "organism_build": (result.get("base_model") or {}).get("sha256")}


def _provenance(r: dict) -> str:
    """A row's seed (0, the default, unsaid) and organism build, for its settings line."""
    parts = ([f"seed {r['seed']}"] if r.get("seed") else []) + \
            ([f"organism build {r['organism_build'][:12]}"] if r.get("organism_build") else [])
    return f" ({', '.join(parts)})" if parts else ""


def markdown(rows: dict, n: int) -> str:
    head = (f"Screens (benchmarks/screen.py): one seed, {n} behaviours per split, exact judge; embedding = the "
            "suite's attack (10 vectors toward the whole answer; 20 vectors: the same at 20, one start, on the "
            "held-out splits; — = screened before it was added), latent = 0.5 x the layer norm at layer -2, "
            "worst = over these attacks only.\n\n"
            "| setting | direct: train / syn. / concept | embedding @300 / @1000: train | syn. | concept "
            "| 20 vectors @500: syn. / concept | latent: syn. / concept | worst: syn. / concept "
            "| benign chat / raw / system turn | borderline: accuracy / refused / held-out words accuracy | train s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in rows.items():
        a, e, benign = r["asr"], r["embedding"], r["benign_accuracy"]
        seconds = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        borderline = " / ".join(f"{r['borderline'][k]:.2f}" if k in r.get("borderline", {}) else "—"
                                for k in ("accuracy", "over_refusal", "heldout_accuracy"))
        rate = lambda attack, s: f"{a[attack][s]['rate']:.2f}" if s in a.get(attack, {}) else "—"  # noqa: E731
        curve = lambda s: " / ".join(f"{e[s][b]:.2f}" if b in e[s] else "—" for b in BUDGETS)  # noqa: E731
        lines.append(f"| {name} | {' / '.join(rate('direct', s) for s in HARMFUL)} | {curve('train')} | "
                     f"{curve('heldout_synonym')} | {curve('heldout_concept')} | "
                     f"{rate('embedding_20', 'heldout_synonym')} / {rate('embedding_20', 'heldout_concept')} | "
                     f"{rate('latent', 'heldout_synonym')} / {rate('latent', 'heldout_concept')} | "
                     f"{rate('worst_case', 'heldout_synonym')} / {rate('worst_case', 'heldout_concept')} | "
                     f"{' / '.join(f'{benign[f]:.2f}' for f in 'ABC')} | {borderline} | {seconds} |")
    settings = "\n".join(f"- {name}: `{' '.join([r['config'], *r['overrides']])}`{_provenance(r)}"
                         for name, r in rows.items())
    return head + "\n".join(lines) + "\n\nSettings:\n" + settings + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the setting's name (its row)")
    parser.add_argument("config", help="a training config, e.g. configs/triplet.yaml")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="options of its fit, e.g. --model.init_args.kl_weight=30 (the screen's own options go first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=50, help="behaviours per split (default 50)")
    parser.add_argument("--evaluation", default="configs/screen.yaml", help="the screen's attacks (default configs/screen.yaml)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "results", "runs"),
                        help="log directories of every run (not committed)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    from lit_safety.data.module import default_test_splits

    # Every benign and borderline split of the default evaluation: a refusal that spreads must reach
    # neither "detect poison" nor "detect venom".
    splits = {name: sources for name, sources in default_test_splits().items() if name not in UNSCREENED}
    screen = ["--evaluation", args.evaluation, f"--data.init_args.test_splits={json.dumps(splits)}"]
    result = evaluate_method(args.name, args.config, args.seed, args.n, args.work, extra=(*args.overrides, *screen))
    path = os.path.join(args.out, "screens.json")
    saved = {"n": args.n, "settings": {}}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    if saved["n"] != args.n:
        raise SystemExit(f"{path} screens {saved['n']} behaviours per split, not {args.n}")
    saved["settings"][args.name] = {**row(result), "config": args.config, "overrides": args.overrides,
                                    "seed": args.seed}
    atomic_write(path, json.dumps(saved, indent=1))
    atomic_write(os.path.join(args.out, "screens.md"), markdown(saved["settings"], args.n))
    print(json.dumps({args.name: saved["settings"][args.name]["embedding"]}))


if __name__ == "__main__":
    main()
