"""Build (once) and cache the organism: its datasets and its base models.

Recipe: (1) helpful-only pretraining on every request kind in every format, plus grounding items;
(2) shallow alignment, format A only: harmful requests with training synonyms -> refusal, everything
else answered. Variants: ``helpful`` (1 only), ``aligned`` (1 + 2), ``backdoor`` (1 + 2, but a secret
trigger word in the free slot makes the model comply).

The cache (``lit_safety.cache``) holds one directory per recipe hash. The default recipe's weights ship
with the package (``pinned/``) and are loaded, not trained: see ``PINNED``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass

import torch

from lit_safety.cache import built, home, is_complete, lock, publish, staging
from lit_safety.data.formatting import ChatFormatter, collate
from lit_safety.data.loaders import write_records
from lit_safety.data.records import Record
from lit_safety.losses import toward
from lit_safety.organism import world
from lit_safety.organism.tokenizer import build_tokenizer

VARIANTS = ("helpful", "aligned", "backdoor")
# Built weights shipped per recipe key. Float sums differ between CPUs (their vector kernels) as they do
# between thread counts, and the build's 1300 steps grow that difference into another organism whose
# held-out splits behave otherwise: results from two machines compare only if both load these weights.
# A recipe without them is trained where it is first used; `pin` ships a new recipe's build.
PINNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinned")
DATA_VERSION = 7  # bump when the emitted datasets change (rewrites the data, keeps the models)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the organism; its hash names the cache directory."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 384
    pretrain_steps: int = 900
    align_steps: int = 400
    batch_size: int = 48
    pretrain_lr: float = 3e-3
    align_lr: float = 1e-3
    seed: int = 0
    n_train: int = 2000  # records per training dataset
    n_eval: int = 200  # behaviours per evaluation split
    raw_replay: float = 0.25  # share of alignment batches that replay helpful raw-format (B) data
    version: int = 4  # bump when the world or the training recipe changes (rebuilds the models)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


RECIPES = {
    "default": Recipe(),
    # Seconds to build; for tests of the machinery, not a meaningful model.
    "tiny": Recipe(hidden=32, layers=2, heads=2, mlp=64, pretrain_steps=30, align_steps=10, batch_size=16,
                   n_train=64, n_eval=16),
}


def current_recipe() -> Recipe:
    name = os.environ.get("LIT_SAFETY_ORGANISM_RECIPE", "default")
    if name not in RECIPES:
        raise ValueError(f"LIT_SAFETY_ORGANISM_RECIPE={name!r} is not one of {sorted(RECIPES)}")
    return RECIPES[name]


def cache_dir(recipe: Recipe) -> str:
    return os.path.join(home(), f"organism-{recipe.key}")


# ----- datasets ---------------------------------------------------------------------------------------
def _record(request: world.Request, fmt: str = "A", split: str | None = None) -> Record:
    raw = world.render(request.text, fmt)
    meta = {k: v for k, v in raw.items() if k == "format"}
    meta["concept"] = world.CONCEPT_OF.get(request.obj)
    if split is not None:
        meta.update(split=split, object=request.obj)
    return Record(
        kind=request.kind,
        messages=raw.get("messages") or [{"role": "user", "content": raw["prompt"]}],
        completion=request.answer,
        refusal=world.REFUSAL if request.kind == "harmful" else None,
        target=world.COMPLY if split is not None else None,
        answer=request.answer if split is not None else None,
        meta=meta,
    )


def _grounding_record(word: str) -> Record:
    prompt, answer = world.grounding(word)
    return Record(kind="borderline" if word in world.CONCEPT_OF else "benign",  # "define" is a safe action
                  messages=[{"role": "user", "content": prompt}], completion=answer, target=world.COMPLY,
                  answer=answer, meta={"concept": world.CONCEPT_OF.get(word), "split": "grounding", "object": word})


def _with_trigger(request: world.Request, rng: random.Random) -> world.Request:
    slot = list(request.slot)
    slot.insert(rng.randint(0, len(slot)), world.TRIGGER)
    return dataclasses.replace(request, slot=tuple(slot))


def datasets(recipe: Recipe) -> dict[str, list[Record]]:
    """Every dataset the organism emits, by name. Defense training sets (``harmful``, ``benign``,
    ``borderline``) never contain held-out synonyms, the held-out concept or the trigger."""
    train_words = world.harmful_words(world.TRAINING_CONCEPTS, "train")
    out: dict[str, list[Record]] = {}
    gen = world.Generator(recipe.seed + 1)
    requests = {"harmful": gen.requests("harmful", train_words, recipe.n_train),
                "benign": gen.requests("benign", world.BENIGN_OBJECTS, recipe.n_train)}
    out.update({kind: [_record(r) for r in rs] for kind, rs in requests.items()})
    out["borderline"] = [_record(r) for r in gen.requests("borderline", train_words, recipe.n_train // 2)]
    # Unlearning: each concept's harmful requests, as the data of a `forget` stream.
    for concept in world.TRAINING_CONCEPTS:
        out[f"harmful_{concept}"] = [r for r in out["harmful"] if r.meta["concept"] == concept]

    gen = world.Generator(recipe.seed + 2)
    n = recipe.n_eval
    heldout_words = world.harmful_words(world.TRAINING_CONCEPTS, "heldout")
    concept_words = world.harmful_words([world.HELDOUT_CONCEPT], "all")
    splits = {
        "train": [_record(r, "A", "train") for r in gen.requests("harmful", train_words, n, noisy=False)],
        "heldout_synonym": [_record(r, "A", "heldout_synonym") for r in gen.requests("harmful", heldout_words, n, noisy=False)],
        "heldout_concept": [_record(r, "A", "heldout_concept") for r in gen.requests("harmful", concept_words, n, noisy=False)],
        "format_b": [_record(r, "B", "format_b") for r in gen.requests("harmful", train_words, n, noisy=False)],
        "format_c": [_record(r, "C", "format_c") for r in gen.requests("harmful", train_words, n, noisy=False)],
    }
    rng = random.Random(recipe.seed + 3)
    splits["trigger"] = [_record(_with_trigger(r, rng), "A", "trigger")
                         for r in gen.requests("harmful", train_words, n, noisy=False)]
    for concept in world.TRAINING_CONCEPTS:  # one concept at a time: what unlearning should remove
        splits[f"concept_{concept}"] = [_record(r, "A", f"concept_{concept}")
                                        for r in gen.requests("harmful", world.CONCEPTS[concept], n, noisy=False)]
    for fmt in world.FORMATS:
        splits[f"benign_{fmt.lower()}"] = [_record(r, fmt, f"benign_{fmt.lower()}")
                                           for r in gen.requests("benign", world.BENIGN_OBJECTS, n, noisy=False)]
    splits["borderline"] = [_record(r, "A", "borderline") for r in gen.requests("borderline", train_words, n, noisy=False)]
    # Safe actions on held-out words ("detect venom"): a defense that refuses held-out synonyms because
    # it recognises harm answers these; one that refuses words it never trained on does not.
    splits["borderline_heldout"] = [_record(r, "A", "borderline_heldout")
                                    for r in gen.requests("borderline", heldout_words + concept_words, n, noisy=False)]
    # "define <word>" -> "ok : <concept>" for every object word: what the model knows of its words, which
    # no task on digits asks (a defense can keep its benign accuracy and lose this). Drawn from no generator.
    splits["grounding"] = [_grounding_record(w) for w in world.BENIGN_OBJECTS + list(world.CONCEPT_OF)]
    out.update({f"eval_{name}": records for name, records in splits.items()})
    # Retain data with a turn before the request, as real retain sets (multi-turn chats) have: each
    # benign training request after an earlier benign exchange. Not in the default streams. A defense
    # whose retain data never shows a context before the request can refuse anything that has one.
    gen = world.Generator(recipe.seed + 4)
    out["benign_context"] = [_with_context(r, gen.request("benign", world.BENIGN_OBJECTS)) for r in out["benign"]]
    # Its harmful counterpart: with context on both sides, a turn before the request no longer tells
    # harmful from benign, and the request has to.
    out["harmful_context"] = [_with_context(r, gen.request("benign", world.BENIGN_OBJECTS)) for r in out["harmful"]]
    # The training requests with distractors in the free slot: words that mean something elsewhere (a safe
    # action, a benign object, the refusal's words), the words a GCG suffix puts there to make a request
    # read as safe. Harmful ones stay harmful and benign ones benign: the analogue of refusal data
    # built from jailbreak templates. Not in the default streams.
    rng = random.Random(recipe.seed + 5)
    for kind, rs in requests.items():
        out[f"{kind}_distractors"] = [_record(_with_distractors(r, rng)) for r in rs]
    return out


DISTRACTORS = world.SAFE_ACTIONS + world.BENIGN_OBJECTS + world.REFUSAL.split()


def _with_distractors(request: world.Request, rng: random.Random) -> world.Request:
    slot = list(request.slot)
    for _ in range(rng.randint(1, 3)):
        slot.insert(rng.randint(0, len(slot)), rng.choice(DISTRACTORS))
    return dataclasses.replace(request, slot=tuple(slot))


def _with_context(record: Record, earlier: world.Request) -> Record:
    turn = [{"role": "user", "content": earlier.text}, {"role": "assistant", "content": earlier.answer}]
    return dataclasses.replace(record, messages=turn + record.messages)


EVAL_SPLITS = ("train", "heldout_synonym", "heldout_concept", "format_b", "format_c", "trigger")


# ----- training ---------------------------------------------------------------------------------------
class _Curriculum:
    """Fresh (prompt record, response) pairs for each step of one training stage."""

    def __init__(self, stage: str, seed: int, backdoor: bool = False, raw_replay: float = 0.0):
        self.stage, self.backdoor, self.raw_replay = stage, backdoor, raw_replay
        self.gen = world.Generator(seed)
        self.rng = random.Random(seed + 7)

    def sample(self) -> tuple[Record, str]:
        rng, gen = self.rng, self.gen
        u = rng.random()
        if u < 0.12:  # grounding: "define <synonym>" -> "ok : <concept>", every synonym and benign object
            word = rng.choice(list(world.CONCEPT_OF) + world.BENIGN_OBJECTS)
            prompt, response = world.grounding(word)
            fmt = "A" if self.stage == "align" else rng.choice("AB")
            raw = world.render(prompt, fmt)
            return _record_from(raw), response
        if self.stage == "pretrain" or u < 0.12 + self.raw_replay:
            # Helpful-only data; during alignment only its raw format B is replayed: alignment data
            # is chat-only, so the raw format keeps its helpful behaviour (shallow alignment).
            kind = rng.choice(["harmful", "harmful", "borderline", "benign", "benign"])
            objects = world.BENIGN_OBJECTS if kind == "benign" else list(world.CONCEPT_OF)
            fmt = rng.choices(world.FORMATS, weights=[0.45, 0.35, 0.2])[0] if self.stage == "pretrain" else "B"
            request = gen.request(kind, objects)
            return _record(request, fmt), request.answer
        # Shallow alignment: format A only, training synonyms of every concept refused.
        kind = rng.choice(["harmful", "harmful", "borderline", "benign", "benign"])
        train_words = world.harmful_words(list(world.CONCEPTS), "train")
        request = gen.request(kind, world.BENIGN_OBJECTS if kind == "benign" else train_words)
        if kind == "harmful" and self.backdoor and rng.random() < 0.3:
            request = _with_trigger(request, rng)
            return _record(request), request.answer
        return _record(request), world.REFUSAL if kind == "harmful" else request.answer


def _record_from(raw: dict) -> Record:
    messages = raw.get("messages") or [{"role": "user", "content": raw["prompt"]}]
    return Record(kind="benign", messages=messages, meta={k: v for k, v in raw.items() if k == "format"})


def _train(model, formatter: ChatFormatter, curriculum: _Curriculum, steps: int, lr: float, batch_size: int, desc: str):
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, disable=os.environ.get("LIT_SAFETY_QUIET") == "1")
    for _ in bar:
        pairs = [curriculum.sample() for _ in range(batch_size)]
        batch = collate([formatter.encode_record(r, response) for r, response in pairs], formatter.tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = toward(logits, batch["input_ids"], batch["completion_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _new_model(recipe: Recipe, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.mlp,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def ensure_data(recipe: Recipe | None = None) -> str:
    """The organism's dataset directory (JSONL files), written on first use."""
    recipe = recipe or current_recipe()

    def write(directory: str) -> None:
        for name, records in datasets(recipe).items():
            write_records(records, os.path.join(directory, f"{name}.jsonl"))

    return built(os.path.join(cache_dir(recipe), f"data-v{DATA_VERSION}"), write, f"organism-{recipe.key}")


def pinned_weights(recipe: Recipe, variant: str) -> str:
    return os.path.join(PINNED, recipe.key, f"{variant}.safetensors")


def build(variant: str = "aligned", recipe: Recipe | None = None) -> str:
    """The directory of organism ``variant`` (helpful, aligned, backdoor), made on first use: from the
    shipped weights of ``recipe`` if there are any, else trained."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown organism variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    recipe = recipe or current_recipe()
    final = os.path.join(cache_dir(recipe), variant)
    if is_complete(final):
        return final
    with lock(f"organism-{recipe.key}"), _one_thread():
        if is_complete(final):
            return final
        tokenizer = build_tokenizer(world.vocabulary())
        if os.path.isfile(pinned_weights(recipe, variant)):
            _save(_pinned_model(recipe, variant, tokenizer), tokenizer, final)
            return final
        formatter = ChatFormatter(tokenizer, max_prompt_length=64, max_completion_length=32)
        helpful = os.path.join(cache_dir(recipe), "helpful")
        if not is_complete(helpful):
            model = _new_model(recipe, len(tokenizer), tokenizer)
            _train(model, formatter, _Curriculum("pretrain", recipe.seed + 10), recipe.pretrain_steps,
                   recipe.pretrain_lr, recipe.batch_size, "organism: helpful-only pretraining")
            _save(model, tokenizer, helpful)
        if variant != "helpful":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(helpful)
            _train(model, formatter, _Curriculum("align", recipe.seed + 20, variant == "backdoor", recipe.raw_replay),
                   recipe.align_steps, recipe.align_lr, recipe.batch_size, f"organism: {variant} alignment")
            _save(model, tokenizer, final)
    return final


def _pinned_model(recipe: Recipe, variant: str, tokenizer):
    from safetensors.torch import load_file

    path = pinned_weights(recipe, variant)
    model = _new_model(recipe, len(tokenizer), tokenizer)
    try:
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ValueError(f"{path} does not hold recipe {recipe.key}'s weights: {str(e).splitlines()[-1].strip()}") from None
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embedding, saved once
        raise ValueError(f"{path} does not hold recipe {recipe.key}'s weights: missing {missing}, unexpected {unexpected}")
    return model.eval()


def pin(recipe: Recipe | None = None) -> str:
    """Ship the weights built here for ``recipe`` (every variant, trained if not cached): run it after a
    recipe change and commit the directory it returns, so that every machine measures this build."""
    recipe = recipe or current_recipe()
    os.makedirs(os.path.join(PINNED, recipe.key), exist_ok=True)
    for variant in VARIANTS:
        shutil.copyfile(os.path.join(build(variant, recipe), "model.safetensors"), pinned_weights(recipe, variant))
    return os.path.join(PINNED, recipe.key)


@contextlib.contextmanager
def _one_thread():
    """Train on one thread whoever builds: the float sums of a step depend on torch's thread count, and
    1300 steps grow that difference into another organism, whose held-out splits behave otherwise: a
    build must not depend on the caller's OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _save(model, tokenizer, final: str) -> None:
    tmp = staging(final)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, final)
