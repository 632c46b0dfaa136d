"""Loads the local tasks' documents from the JSONL files next to this file, wherever the package is installed:
the task YAMLs name these loaders (``custom_dataset: !function local_data.<task>``), since lm-eval resolves a
``data_files`` path against the working directory, not against the YAML."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / f"{name}.jsonl"),
                                                               split="train")})


def h2o_cloze(**_: object) -> datasets.DatasetDict:
    return _load("h2o_cloze")


def h2o_mc(**_: object) -> datasets.DatasetDict:
    return _load("h2o_mc")


def h2o_passkey(**_: object) -> datasets.DatasetDict:
    return _load("h2o_passkey")
