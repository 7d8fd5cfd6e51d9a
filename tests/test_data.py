import csv
import json

import pytest
import torch

from lit_safety.backbone import load_tokenizer
from lit_safety.data import (
    ChatFormatter,
    DataError,
    DataSource,
    SafetyDataModule,
    Stream,
    collate,
    load_records,
    register_dataset_resolver,
    require_chat_template,
)
from lit_safety.data.records import Record
from lit_safety.named import DATASET_RESOLVERS

ROWS = [
    {"prompt": "make poison reverse 1 2", "kind": "harmful", "completion": "ok : 2 1", "refusal": "sorry i cannot help",
     "category": "poison"},
    {"prompt": "make apple copy 3 4", "kind": "benign", "completion": "ok : 3 4", "category": "food"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_json_csv_parquet_load_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "kind", "completion", "refusal", "category"])
        writer.writeheader()
        writer.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    loaded = [load_records(str(tmp_path / f"d.{ext}")) for ext in ("jsonl", "json", "csv", "parquet")]
    for records in loaded:
        assert [r.prompt for r in records] == [r["prompt"] for r in ROWS]
        assert records[0].refusal == "sorry i cannot help" and records[1].refusal is None
        assert records[1].meta["category"] == "food"
    assert load_records(jsonl)[0].messages == [{"role": "user", "content": ROWS[0]["prompt"]}]


def test_column_mapping_and_defaults_like_advbench(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("goal,target\nmake poison,Sure here is\n")
    (record,) = load_records(DataSource(str(path), columns={"prompt": "goal"}, kind="harmful", refusal="no"))
    assert (record.prompt, record.kind, record.target, record.refusal) == ("make poison", "harmful", "Sure here is", "no")


def test_messages_transcript_takes_last_assistant_turn_as_completion(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok : hi"}]}]
    (record,) = load_records(DataSource(write_jsonl(tmp_path / "chat.jsonl", rows), kind="benign"))
    assert record.messages == [{"role": "user", "content": "hi"}] and record.completion == "ok : hi"


def test_with_prompt_replaces_the_last_user_turn_only():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    record = Record(kind="harmful", messages=messages, completion="x", answer="y")
    changed = record.with_prompt("c please")
    assert changed.prompt == "c please" and changed.messages[:3] == messages[:3]
    assert (changed.kind, changed.completion, changed.answer) == ("harmful", "x", "y")
    assert record.prompt == "c"  # the original is untouched


def test_local_hugging_face_dataset_directory(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"Behavior": "make bomb", "rejected": "ok : 1", "chosen": "no"}])
    source = DataSource(str(folder), columns={"prompt": "Behavior", "completion": "rejected", "refusal": "chosen"},
                        kind="harmful")
    (record,) = load_records(source)
    assert (record.prompt, record.completion, record.refusal) == ("make bomb", "ok : 1", "no")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "kind": "harmful"}\n{"prompt": "b", \n', r"bad.jsonl:2: malformed JSON line"),
        ('{"kind": "harmful"}\n', r"bad.jsonl:1: record needs a 'prompt'"),
        ('{"prompt": "a", "kind": "evil"}\n', r"bad.jsonl:1: unknown kind 'evil'"),
        ('{"prompt": "a"}\n', r"bad.jsonl:1: record has no 'kind'"),
        ('{"prompt": 3, "kind": "benign"}\n', r"bad.jsonl:1: field 'prompt' must be a string"),
        ("", r"holds no records"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(str(path))


def test_missing_file_and_missing_mapped_column(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"d.jsonl:1: mapped column\(s\) \['Behavior'\] not found"):
        load_records(DataSource(path, columns={"prompt": "Behavior"}))


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="has no chat template.*`chat_template` argument"):
        require_chat_template(tokenizer)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    require_chat_template(tokenizer, str(template))
    assert tokenizer.chat_template.startswith("{% for m")


def test_formatter_masks_prompt_and_completion(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    formatter = ChatFormatter(tokenizer, max_prompt_length=32, max_completion_length=32)
    messages = [{"role": "user", "content": "make poison reverse 1 2"}]
    encoded = formatter.encode(messages, "ok : 2 1")
    batch = collate([encoded, formatter.encode(messages, None)], tokenizer.pad_token_id)
    completion = batch["input_ids"][0][batch["completion_mask"][0]]
    assert tokenizer.decode(completion) == "ok : 2 1 <end>"
    assert tokenizer.decode(batch["input_ids"][0][batch["prompt_mask"][0]]).endswith("<assistant>")
    # The prompt-only row is padded on the right and has no completion tokens.
    assert not batch["completion_mask"][1].any() and batch["input_ids"][1, -1] == tokenizer.pad_token_id
    assert torch.equal(batch["attention_mask"][1], batch["prompt_mask"][1])
    # The template's own assistant mask agrees with ours.
    ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "ok : 2 1"}], tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    assert ids["assistant_masks"] == batch["completion_mask"][0].long().tolist()


def test_truncation_keeps_prompt_end_and_completion_start(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    formatter = ChatFormatter(tokenizer, max_prompt_length=3, max_completion_length=2)
    encoded = formatter.encode([{"role": "user", "content": "make poison reverse 1 2"}], "ok : 2 1")
    assert tokenizer.decode(encoded.input_ids) == "2 <end> <assistant> ok :"
    assert encoded.prompt_length == 3


def test_data_module_streams_split_and_seed(tiny_model_dir, data_files):
    def make(seed):
        dm = SafetyDataModule(
            {k: Stream([v], 16, 8) for k, v in data_files.items()}, batch_size=4, val_fraction=0.25,
            tokenizer=tiny_model_dir, seed=seed,
        )
        dm.setup("fit")
        return dm

    dm = make(0)
    assert {k: len(v) for k, v in dm.train_records.items()} == {"harmful": 9, "benign": 9}
    assert {k: len(v) for k, v in dm.val_records.items()} == {"harmful": 3, "benign": 3}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"harmful", "benign"}
    assert set(batch["harmful"]) == {"completion", "refusal"} and set(batch["benign"]) == {"completion"}
    assert batch["harmful"]["refusal"]["input_ids"].shape[0] == 4
    again = next(iter(make(0).train_dataloader()))
    other = next(iter(make(1).train_dataloader()))
    assert torch.equal(batch["harmful"]["completion"]["input_ids"], again["harmful"]["completion"]["input_ids"])
    assert [r.prompt for r in make(1).val_records["harmful"]] != [r.prompt for r in dm.val_records["harmful"]]
    del other


def test_registered_dataset_prefix_resolves_and_names_its_unknown_sets(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    def resolve(name: str) -> str:
        if name != "train":
            raise FileNotFoundError(f"no set {name!r}; available: train")
        return str(path)

    register_dataset_resolver("mine", resolve)
    try:
        assert [r.prompt for r in load_records("mine:train")] == [r.prompt for r in load_records(str(path))]
        with pytest.raises(DataError, match="'mine:test'.*available: train"):
            load_records("mine:test")
    finally:
        del DATASET_RESOLVERS["mine"]


def test_global_batch_size_is_shared_by_processes_and_accumulated_batches(tiny_model_dir, data_files):
    import lightning as L

    def per_device(global_batch_size, accumulate):
        dm = SafetyDataModule({k: Stream([v], 16, 8) for k, v in data_files.items()}, global_batch_size=global_batch_size,
                              tokenizer=tiny_model_dir)
        dm.trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=accumulate, logger=False)
        dm.setup("fit")
        return dm.batch_size, next(iter(dm.train_dataloader()))["harmful"]["completion"]["input_ids"].shape[0]

    assert per_device(8, 2) == (4, 4)
    assert per_device(6, 1) == (6, 6)
    with pytest.raises(DataError, match="global_batch_size=7 is not a multiple of processes x accumulate_grad_batches"):
        per_device(7, 2)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        SafetyDataModule(global_batch_size=0)
