"""Typed, validated reading of a parsed ``report.json``: every failure is a `ValueError` naming the report, the
dotted key and the problem. Used by :class:`~diffusers_hold.audit.AuditReport` and its protocol sections."""

from __future__ import annotations

from typing import Any

import torch

from .._validation import is_integer, is_real_number
from ..metrics import CopyDetectionReport, MemorizationReport

# JSON value kinds of report.json: name -> (test, description in messages); "list[kind]" and "kind?" (or null) build
# on them
_KINDS = {
    "int": (is_integer, "an integer"),
    "number": (is_real_number, "a number"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "str": (lambda value: isinstance(value, str), "a string"),
    "dict": (lambda value: isinstance(value, dict), "an object"),
    "list": (lambda value: isinstance(value, list), "a list"),
    # a prompt id of the protocol: the prompt's text, or a generation's index (unconditional pipelines)
    "id": (lambda value: isinstance(value, str) or is_integer(value), "a string or an integer"),
}


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    names[dict] = "an object"
    return "null" if value is None else names.get(type(value), type(value).__name__)


class _ReportReader:
    """Typed access to the keys of a parsed ``report.json``; every failure is a `ValueError` naming the report, the
    dotted key and the problem."""

    def __init__(self, data: Any, source: str):
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object, not {_json_type(data)}.")
        self.data, self.source = data, source

    def read(self, key: str, kind: str) -> Any:
        value = self.data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):  # an item of a list
                value = value[int(part)]
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{self.source}: `{parent}` must be an object, got {_json_type(value)}.")
            if part not in value:
                raise ValueError(f"{self.source} has no `{key}`.")
            value = value[part]
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if value is None and optional:
            return None
        if kind.startswith("list["):
            test, description = _KINDS[kind[5:-1]]
            if not isinstance(value, list):
                raise ValueError(f"{self.source}: `{key}` must be a list, got {_json_type(value)}.")
            for index, item in enumerate(value):
                if not test(item):
                    raise ValueError(
                        f"{self.source}: item {index} of `{key}` must be {description}, got {_json_type(item)}."
                    )
            return value
        test, description = _KINDS[kind]
        if not test(value):
            raise ValueError(f"{self.source}: `{key}` must be {description}, got {_json_type(value)} ({value!r:.60}).")
        return value

    def one_of(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.read(key, "str")
        if value not in allowed:
            raise ValueError(f"{self.source}: `{key}` is {value!r}; expected one of {', '.join(allowed)}.")
        return value

    def list_of_length(self, key: str, kind: str, count_key: str) -> list:
        """The list at `key` (of `kind`), which must have as many items as the integer at `count_key` says."""
        values, count = self.read(key, kind), self.read(count_key, "int")
        if len(values) != count:
            raise ValueError(f"{self.source}: `{key}` has {len(values)} values but `{count_key}` is {count}.")
        return values


def _memorization_from_dict(reader: _ReportReader, key: str = "memorization") -> MemorizationReport:
    """The :class:`MemorizationReport` of ``MemorizationReport.to_dict(per_sample=True)`` under the dotted ``key``."""
    reader.one_of(f"{key}.metric", ("nn_ratio",))
    # the dtypes nn_ratio_memorization computes them in
    per_sample = {}
    for name, kind, dtype in (
        ("d1", "list[number]", torch.float32),
        ("d2", "list[number]", torch.float32),
        ("ratio", "list[number]", torch.float32),
        ("nearest_index", "list[int]", torch.long),
        ("memorized", "list[bool]", torch.bool),
    ):
        values = reader.list_of_length(f"{key}.per_sample.{name}", kind, f"{key}.num_generated")
        per_sample[name] = torch.tensor(values, dtype=dtype)
    held_out_ratio = None
    if reader.read(f"{key}.held_out_ratio", "list[number]?") is not None:
        values = reader.list_of_length(f"{key}.held_out_ratio", "list[number]", f"{key}.num_held_out")
        held_out_ratio = torch.tensor(values, dtype=torch.float32)
    return MemorizationReport(
        **per_sample,
        threshold=float(reader.read(f"{key}.threshold", "number")),
        squared=reader.read(f"{key}.squared", "bool"),
        fraction_memorized=float(reader.read(f"{key}.fraction_memorized", "number")),
        distinct_copied=reader.read(f"{key}.distinct_copied", "int"),
        copied_indices=torch.tensor(reader.read(f"{key}.copied_indices", "list[int]"), dtype=torch.long),
        num_train=reader.read(f"{key}.num_train", "int"),
        held_out_ratio=held_out_ratio,
        held_out_fraction=reader.read(f"{key}.held_out_fraction", "number?"),
    )


def _interval(reader: _ReportReader, key: str) -> tuple[float, float]:
    """A ``[low, high]`` pair of numbers."""
    values = reader.read(key, "list[number]")
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"{reader.source}: `{key}` must be [low, high] with low <= high, got {values!r:.60}.")
    return float(values[0]), float(values[1])


def _copy_detection_from_dict(reader: _ReportReader, key: str) -> CopyDetectionReport:
    """The :class:`CopyDetectionReport` of ``CopyDetectionReport.to_dict(per_sample=True)`` under ``key``."""
    reader.one_of(f"{key}.metric", ("copy_detection",))
    reader.one_of(f"{key}.similarity", ("cosine",))
    count = reader.read(f"{key}.num_prompts", "int")
    if len(reader.read(f"{key}.per_prompt", "list")) != count:
        raise ValueError(f"{reader.source}: `{key}.per_prompt` does not have `{key}.num_prompts` = {count} records.")
    per_prompt: dict[str, list] = {"prompt": [], "num_generations": [], "max_similarity": [], "top_k_mean": []}
    per_prompt["fraction_copied"] = []
    kinds = {"prompt": "id", "num_generations": "int"}
    for p in range(count):
        for name, values in per_prompt.items():
            values.append(reader.read(f"{key}.per_prompt.{p}.{name}", kinds.get(name, "number")))
    position = {prompt: p for p, prompt in enumerate(per_prompt["prompt"])}
    sample_prompts = reader.list_of_length(f"{key}.per_sample.prompt", "list[id]", f"{key}.num_generated")
    unknown = [i for i, prompt in enumerate(sample_prompts) if prompt not in position]
    if unknown or len(position) != count:
        raise ValueError(
            f"{reader.source}: the prompts of `{key}.per_sample.prompt` and `{key}.per_prompt` do not match (item "
            f"{unknown[0] if unknown else 0})."
        )
    per_sample = {
        name: torch.tensor(
            reader.list_of_length(f"{key}.per_sample.{name}", kind, f"{key}.num_generated"), dtype=dtype
        )
        for name, kind, dtype in (
            ("max_similarity", "list[number]", torch.float32),
            ("nearest_reference", "list[int]", torch.int64),
            ("copied", "list[bool]", torch.bool),
        )
    }
    return CopyDetectionReport(
        **per_sample,
        prompt_index=torch.tensor([position[prompt] for prompt in sample_prompts], dtype=torch.int64),
        prompts=per_prompt["prompt"],
        prompt_num_generations=torch.tensor(per_prompt["num_generations"], dtype=torch.int64),
        prompt_max_similarity=torch.tensor(per_prompt["max_similarity"], dtype=torch.float64),
        prompt_top_k_mean=torch.tensor(per_prompt["top_k_mean"], dtype=torch.float64),
        prompt_fraction_copied=torch.tensor(per_prompt["fraction_copied"], dtype=torch.float64),
        mean_max_similarity=float(reader.read(f"{key}.mean_max_similarity", "number")),
        mean_max_similarity_interval=_interval(reader, f"{key}.mean_max_similarity_interval"),
        mean_top_k=float(reader.read(f"{key}.mean_top_k", "number")),
        mean_top_k_interval=_interval(reader, f"{key}.mean_top_k_interval"),
        fraction_copied=float(reader.read(f"{key}.fraction_copied", "number")),
        fraction_copied_interval=_interval(reader, f"{key}.fraction_copied_interval"),
        threshold=float(reader.read(f"{key}.threshold", "number")),
        top_k=reader.read(f"{key}.top_k", "int"),
        confidence=float(reader.read(f"{key}.confidence", "number")),
        n_bootstrap=reader.read(f"{key}.n_bootstrap", "int"),
        seed=reader.read(f"{key}.seed", "int"),
        features=reader.read(f"{key}.features", "str"),
        per_prompt_references=reader.read(f"{key}.per_prompt_references", "bool"),
        num_references=reader.read(f"{key}.num_references", "int"),
    )
