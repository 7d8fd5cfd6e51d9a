"""Records, loaders, chat formatting and the ``SafetyDataModule``."""

from lit_safety.data.formatting import ChatFormatter, collate, require_chat_template
from lit_safety.data.loaders import (
    DATASET_RESOLVERS,
    DataSource,
    load_records,
    register_dataset_resolver,
    write_records,
)
from lit_safety.data.module import SafetyDataModule, Stream
from lit_safety.data.records import KINDS, DataError, Record, parse_record

__all__ = [
    "DATASET_RESOLVERS",
    "KINDS",
    "ChatFormatter",
    "DataError",
    "DataSource",
    "Record",
    "SafetyDataModule",
    "Stream",
    "collate",
    "load_records",
    "parse_record",
    "register_dataset_resolver",
    "require_chat_template",
    "write_records",
]
