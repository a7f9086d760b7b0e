"""The audit's report: what :func:`~diffusers_hold.audit.audit_pipeline` measured, as ``report.json`` (written and
read back, validated) and as Markdown for a model card."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._validation import is_integer, is_real_number
from ..metrics import MemorizationReport, QualityReport

__all__ = ["REPORT_FILE_NAME", "REPORT_FORMAT_VERSION", "AuditReport"]

# Version of the report.json layout written by AuditReport.to_json and read by AuditReport.from_json; raise it when
# the layout changes, so that an old reader refuses a new file instead of misreading it.
REPORT_FORMAT_VERSION = 1
REPORT_FILE_NAME = "report.json"
# where the step count of the audit came from: the scheduler's recommendation for its solver, the default of the
# pipeline's __call__, or the caller
STEPS_SOURCES = ("scheduler", "pipeline", "user")


@dataclass
class AuditReport:
    """What :func:`audit_pipeline` measured.

    Written to ``report.json`` by :func:`audit_pipeline` (:meth:`to_json`) and read back, validated, by
    :meth:`load`; :func:`diffusers_hold.hub.save_for_hub` turns it into the model card's "Memorization audit" section
    (:meth:`to_markdown`) and model-index metrics (:meth:`model_index_metrics`).

    Attributes:
        memorization (`MemorizationReport`): nearest-neighbour ratios of the generations and of the held-out control.
        quality (`QualityReport`, *optional*): Fréchet distance and precision / recall (`None` with too few held-out
            images for the PCA, or too few generations for the k-NN radii).
        pipeline_class (`str`): the audited pipeline's class.
        prompts (`list[str]`, *optional*): the prompt of each generation (text-to-image).
        settings (`dict`): the generation settings: ``num_samples``, ``batch_size``, ``seed``, ``image_shape``,
            ``num_inference_steps``, ``num_inference_steps_source`` (`"scheduler"`: the scheduler's recommendation for
            its solver, `"pipeline"`: the default of the pipeline's ``__call__``, `"user"`: chosen for the audit),
            ``default_num_inference_steps`` (what the audit would use by default; `None` if nothing states one),
            ``scheduler`` (class name) and ``scheduler_config`` (its public config).
        files (`dict[str, str]`): the files written, by kind.
    """

    memorization: MemorizationReport
    quality: QualityReport | None
    pipeline_class: str
    prompts: list[str] | None
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump`` (per-sample memorization values included)."""
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "pipeline_class": self.pipeline_class,
            "settings": self.settings,
            "memorization": self.memorization.to_dict(per_sample=True),
            "quality": None if self.quality is None else self.quality.to_dict(),
            "prompts": self.prompts,
            "files": self.files,
        }

    def to_markdown(self) -> str:
        """The summary as Markdown (a model card section)."""
        mem = self.memorization
        lines = [
            f"Audit of `{self.pipeline_class}`: {mem.num_generated} generations (seed {self.settings['seed']}) "
            f"against {mem.num_train} training images.",
            "",
            f"Sampler: {self._sampler_description()}.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| memorized generations (nearest / second-nearest distance < {mem.threshold:.3g}) | "
            f"{mem.fraction_memorized:.1%} |",
            f"| distinct training images copied | {mem.distinct_copied} |",
            f"| median distance ratio | {float(mem.ratio.double().median()):.3f} |",
        ]
        if mem.held_out_fraction is not None:
            control = "held-out real images below the threshold (control, ~0 expected)"
            lines.append(f"| {control} | {mem.held_out_fraction:.1%} |")
        quality = self.quality
        if quality is not None:
            lines += [
                f"| Fréchet distance to held-out images (PCA features) | {quality.frechet_distance:.4g} |",
                f"| same for the training images (floor) | {quality.floor_frechet_distance:.4g} |",
                f"| precision / recall (k-NN, k = {quality.k}) | {quality.precision:.3f} / {quality.recall:.3f} |",
            ]
        shape = "x".join(str(size) for size in self.settings["image_shape"])
        lines += [
            "",
            f"Memorization: the 1/3 rule on L2 distances in pixel space ({shape} images, values in [0, 1]), each "
            "generation against its nearest and second-nearest training images.",
        ]
        if quality is not None:
            lines[-1] += (
                f" Quality: in the {quality.feature_dim} features of `{quality.feature_extractor}`, fitted on the "
                f"{quality.num_held_out} held-out images."
            )
        return "\n".join(lines)

    def _sampler_description(self) -> str:
        settings = self.settings
        config = settings["scheduler_config"] or {}
        labels = {"solver": "solver", "timestep_spacing": "timestep spacing", "order": "HOLD order"}
        details = ", ".join(f"{label} `{config[key]}`" for key, label in labels.items() if key in config)
        scheduler = f"`{settings['scheduler']}`" + (f" ({details})" if details else "")
        steps, source, default = (
            settings["num_inference_steps"],
            settings["num_inference_steps_source"],
            settings["default_num_inference_steps"],
        )
        if source == "scheduler":
            why = f"the count `{settings['scheduler']}` recommends for its solver"
        elif source == "pipeline":
            why = f"the default of `{self.pipeline_class}`"
        elif default is None:
            why = "chosen for this audit"
        else:
            why = f"chosen for this audit; the default is {default}"
            if steps < default:
                why += ", and fewer steps can under-report copying"
        return f"{scheduler}, {steps} steps ({why})"

    def model_index_metrics(self) -> list[dict[str, Any]]:
        """The headline numbers as ``(name, type, value)`` records for model-index metadata."""
        mem = self.memorization
        metrics = [
            {"name": "memorized fraction (1/3 rule)", "type": "memorized_fraction", "value": mem.fraction_memorized},
            {"name": "distinct training images copied", "type": "distinct_copied", "value": mem.distinct_copied},
        ]
        if self.quality is not None:
            value = self.quality.frechet_distance
            metrics.append({"name": "Frechet distance (PCA)", "type": "frechet_distance", "value": value})
        return metrics

    def to_json(self) -> str:
        """The ``report.json`` text: :meth:`to_dict` as indented JSON, read back by :meth:`from_json`."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "The audit report") -> AuditReport:
        """Rebuild a report from :meth:`to_dict`'s values, checking every key the report needs and its type.

        Args:
            data (`dict`): the parsed ``report.json``.
            source (`str`, defaults to `"The audit report"`): how error messages name the report (e.g. its path).

        Raises:
            `ValueError`: naming the first problem: not a JSON object, a missing key, a value of the wrong type, a
                ``format_version`` other than :data:`REPORT_FORMAT_VERSION`, or per-sample lists whose lengths do
                not match the counts.
        """
        reader = _ReportReader(data, source)
        if "format_version" not in data:
            raise ValueError(
                f"{source} has no `format_version`: it is not a report.json of `diffusers-hold audit` (or was written "
                f"before format {REPORT_FORMAT_VERSION}); re-run the audit."
            )
        version = reader.read("format_version", "int")
        if version != REPORT_FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version}; this version of diffusers-hold reads format_version "
                f"{REPORT_FORMAT_VERSION}. Re-run the audit, or read it with the diffusers-hold that wrote it."
            )
        settings = reader.read("settings", "dict")
        for key, kind in (
            ("num_samples", "int"),
            ("batch_size", "int"),
            ("seed", "int"),
            ("image_shape", "list[int]"),
            ("num_inference_steps", "int"),
            ("num_inference_steps_source", "str"),
            ("default_num_inference_steps", "int?"),
            ("scheduler", "str?"),
            ("scheduler_config", "dict?"),
        ):
            reader.read(f"settings.{key}", kind)
        reader.one_of("settings.num_inference_steps_source", STEPS_SOURCES)
        prompts = reader.read("prompts", "list[str]?")
        files = reader.read("files", "dict")
        for kind in files:
            reader.read(f"files.{kind}", "str")
        memorization = _memorization_from_dict(reader)
        if prompts is not None:
            reader.list_of_length("prompts", "list[str]", "memorization.num_generated")
        quality = None
        if reader.read("quality", "dict?") is not None:
            reader.one_of("quality.metric", ("quality",))
            # QualityReport's fields are plain numbers and strings: read each one under its declared type
            kinds = {"float": "number", "int": "int", "str": "str"}
            quality = QualityReport(
                **{
                    item.name: reader.read(f"quality.{item.name}", kinds[item.type])
                    for item in dataclasses.fields(QualityReport)
                }
            )
        return cls(
            memorization=memorization,
            quality=quality,
            pipeline_class=reader.read("pipeline_class", "str"),
            prompts=prompts,
            settings=settings,
            files=files,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "The audit report") -> AuditReport:
        """Parse and validate ``report.json`` text (see :meth:`from_dict`, which names what is wrong in a bad one).

        Raises:
            `ValueError`: if the text is not JSON, or :meth:`from_dict` refuses it.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}.") from error
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AuditReport:
        """Read the ``report.json`` that :func:`audit_pipeline` (``diffusers-hold audit``) wrote.

        Args:
            path (`str` or `os.PathLike`): the file, or the audit's output folder that holds ``report.json``.

        Raises:
            `FileNotFoundError`: if there is no such file.
            `ValueError`: if the file is not a valid report (see :meth:`from_json`); the message names the file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No audit report at {path}; `diffusers-hold audit` writes {REPORT_FILE_NAME} to its --output_dir."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"The audit report {path} is not a JSON text file: {error}.") from error
        return cls.from_json(text, source=f"The audit report {path}")


# JSON value kinds of report.json: name -> (test, description in messages); "list[kind]" and "kind?" (or null) build
# on them
_KINDS = {
    "int": (is_integer, "an integer"),
    "number": (is_real_number, "a number"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "str": (lambda value: isinstance(value, str), "a string"),
    "dict": (lambda value: isinstance(value, dict), "an object"),
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


def _memorization_from_dict(reader: _ReportReader) -> MemorizationReport:
    """The :class:`MemorizationReport` of ``MemorizationReport.to_dict(per_sample=True)`` under ``memorization``."""
    reader.one_of("memorization.metric", ("nn_ratio",))
    # the dtypes nn_ratio_memorization computes them in
    per_sample = {}
    for name, kind, dtype in (
        ("d1", "list[number]", torch.float32),
        ("d2", "list[number]", torch.float32),
        ("ratio", "list[number]", torch.float32),
        ("nearest_index", "list[int]", torch.long),
        ("memorized", "list[bool]", torch.bool),
    ):
        values = reader.list_of_length(f"memorization.per_sample.{name}", kind, "memorization.num_generated")
        per_sample[name] = torch.tensor(values, dtype=dtype)
    held_out_ratio = None
    if reader.read("memorization.held_out_ratio", "list[number]?") is not None:
        values = reader.list_of_length("memorization.held_out_ratio", "list[number]", "memorization.num_held_out")
        held_out_ratio = torch.tensor(values, dtype=torch.float32)
    return MemorizationReport(
        **per_sample,
        threshold=float(reader.read("memorization.threshold", "number")),
        squared=reader.read("memorization.squared", "bool"),
        fraction_memorized=float(reader.read("memorization.fraction_memorized", "number")),
        distinct_copied=reader.read("memorization.distinct_copied", "int"),
        copied_indices=torch.tensor(reader.read("memorization.copied_indices", "list[int]"), dtype=torch.long),
        num_train=reader.read("memorization.num_train", "int"),
        held_out_ratio=held_out_ratio,
        held_out_fraction=reader.read("memorization.held_out_fraction", "number?"),
    )
