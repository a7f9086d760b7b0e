"""The audit's report: what :func:`~diffusers_hold.audit.audit_pipeline` (and
:func:`~diffusers_hold.audit.audit_prompt_set`) measured, as ``report.json`` (written and read back, validated) and as
Markdown for a model card."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..metrics import CopyDetectionReport, MemorizationReport, QualityReport
from ._report_reader import _copy_detection_from_dict, _interval, _memorization_from_dict, _ReportReader

__all__ = ["REPORT_FILE_NAME", "REPORT_FORMAT_VERSION", "AuditReport", "ProtocolReport"]

# Version of the report.json layout written by AuditReport.to_json and read by AuditReport.from_json; raise it when
# the layout changes, so that an old reader refuses a new file instead of misreading it.
REPORT_FORMAT_VERSION = 1
REPORT_FILE_NAME = "report.json"
# where the step count of the audit came from: the scheduler's recommendation for its solver, the default of the
# pipeline's __call__, or the caller
STEPS_SOURCES = ("scheduler", "pipeline", "user")
# what the prompt-set protocol compares generations with: every training image, or each prompt's own references
PROTOCOL_REFERENCES = ("training", "per_prompt")
# the reference set of its 1/3 rule: the training images, or (without them) all reference images pooled
NN_REFERENCES = ("training", "references")
# how reports name the feature kinds of diffusers_hold.metrics.load_features
FEATURE_NAMES = {"pca": "PCA", "dinov2": "DINOv2", "clip": "CLIP image", "sscd": "SSCD"}


@dataclass
class ProtocolReport:
    """One variant of the prompt-set protocol: the generations made with one inference-time mitigation (or with
    none), scored as the copy-detection papers score them, plus the 1/3 rule in the same feature space and in pixel
    space.

    :func:`~diffusers_hold.audit.audit_prompt_set` writes one per variant under ``protocol`` in ``report.json``,
    keyed by the mitigation's name; every variant has the same prompts, seeds and references.

    Attributes:
        mitigation (`str`): ``"none"`` or the inference-time mitigation applied (one of
            :data:`~diffusers_hold.audit.INFERENCE_MITIGATIONS`).
        mitigation_settings (`dict`): its settings (guidance scale, schedule, thresholds, masked neurons, ...), with a
            one-line ``description``.
        features (`str`): the feature kind: ``"pca"``, ``"dinov2"``, ``"clip"`` or ``"sscd"``.
        feature_extractor (`str`): the extractor as it describes itself: class, weights (file or folder name, or Hub
            id) and input size.
        references (`str`): ``"training"`` (each generation against every training image) or ``"per_prompt"``
            (against its own prompt's reference images).
        nn_reference (`str`): the reference set of both 1/3 rules: the ``"training"`` images, or, without training
            images, all reference images pooled (``"references"``).
        copy_detection (`CopyDetectionReport`): per-generation highest cosine similarity; per prompt the highest, the
            top-k mean and the fraction of copies; overall their means with bootstrap intervals over prompts.
        feature_memorization (`MemorizationReport`): the 1/3 rule on L2 distances between the feature vectors
            (L2-normalised first when ``features_normalised``), with the held-out control when there were held-out
            images.
        features_normalised (`bool`): whether the features were L2-normalised before that rule (the cosine
            extractors; the L2 distance of unit vectors, ``sqrt(2 - 2 cos)``, orders neighbours as the protocol's
            cosine similarity does). PCA features are used as they are (L2).
        memorization (`MemorizationReport`): the 1/3 rule in pixel space, as :func:`audit_pipeline` computes it.
        images_per_prompt (`int`, *optional*): generations per prompt; `None` for an unconditional pipeline, whose
            generations are each their own group (prompt id: the generation's index).
        prompt_file (`str`, *optional*): the prompt file the prompts came from.
        clip_model (`str`, *optional*): the CLIP model of the CLIP score; `None` when it was not measured.
        clip_score (`torch.Tensor` of shape `(N,)`, *optional*): each generation's CLIP score with its prompt.
        prompt_clip_score (`torch.Tensor` of shape `(P,)`, *optional*): its mean per prompt (float64), in the order of
            ``copy_detection.prompts``.
        clip_score_mean (`float`, *optional*): the mean over prompts of ``prompt_clip_score``.
        clip_score_interval (`tuple[float, float]`, *optional*): its percentile-bootstrap interval over prompts (the
            copy detection's level, number of resamples and seed).
        timings (`dict[str, float]`): wall seconds per phase: ``generation_s``, ``features_s`` (the generations'
            features), ``protocol_s`` (copy detection and both 1/3 rules), ``clip_score_s``, and in the first variant
            ``reference_features_s`` (features of the reference, training and held-out images, computed once).
    """

    mitigation: str
    mitigation_settings: dict[str, Any]
    features: str
    feature_extractor: str
    references: str
    nn_reference: str
    copy_detection: CopyDetectionReport
    feature_memorization: MemorizationReport
    features_normalised: bool
    memorization: MemorizationReport
    images_per_prompt: int | None = None
    prompt_file: str | None = None
    clip_model: str | None = None
    clip_score: torch.Tensor | None = None
    prompt_clip_score: torch.Tensor | None = None
    clip_score_mean: float | None = None
    clip_score_interval: tuple[float, float] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump`` (per-sample values included), read back by :class:`AuditReport`."""
        clip = None
        if self.clip_model is not None:
            clip = {
                "model": self.clip_model,
                "mean": self.clip_score_mean,
                "interval": list(self.clip_score_interval),
                "per_prompt": self.prompt_clip_score.tolist(),
                "per_sample": self.clip_score.tolist(),
            }
        return {
            "mitigation": self.mitigation,
            "mitigation_settings": self.mitigation_settings,
            "features": self.features,
            "feature_extractor": self.feature_extractor,
            "references": self.references,
            "nn_reference": self.nn_reference,
            "images_per_prompt": self.images_per_prompt,
            "prompt_file": self.prompt_file,
            "features_normalised": self.features_normalised,
            "copy_detection": self.copy_detection.to_dict(per_sample=True),
            "feature_memorization": self.feature_memorization.to_dict(per_sample=True),
            "memorization": self.memorization.to_dict(per_sample=True),
            "clip_score": clip,
            "timings": dict(self.timings),
        }

    @classmethod
    def _read(cls, reader: _ReportReader, key: str) -> ProtocolReport:
        """The section at the dotted ``key`` of a parsed ``report.json``, every value checked."""
        copy = _copy_detection_from_dict(reader, f"{key}.copy_detection")
        clip: dict[str, Any] = {}
        if reader.read(f"{key}.clip_score", "dict?") is not None:
            per_sample = reader.list_of_length(
                f"{key}.clip_score.per_sample", "list[number]", f"{key}.copy_detection.num_generated"
            )
            per_prompt = reader.list_of_length(
                f"{key}.clip_score.per_prompt", "list[number]", f"{key}.copy_detection.num_prompts"
            )
            clip = {
                "clip_model": reader.read(f"{key}.clip_score.model", "str"),
                "clip_score": torch.tensor(per_sample, dtype=torch.float32),
                "prompt_clip_score": torch.tensor(per_prompt, dtype=torch.float64),
                "clip_score_mean": float(reader.read(f"{key}.clip_score.mean", "number")),
                "clip_score_interval": _interval(reader, f"{key}.clip_score.interval"),
            }
        timings = reader.read(f"{key}.timings", "dict")
        for name in timings:
            reader.read(f"{key}.timings.{name}", "number")
        images_per_prompt = reader.read(f"{key}.images_per_prompt", "int?")
        return cls(
            mitigation=reader.read(f"{key}.mitigation", "str"),
            mitigation_settings=reader.read(f"{key}.mitigation_settings", "dict"),
            features=reader.one_of(f"{key}.features", ("pca", "dinov2", "clip", "sscd")),
            feature_extractor=reader.read(f"{key}.feature_extractor", "str"),
            references=reader.one_of(f"{key}.references", PROTOCOL_REFERENCES),
            nn_reference=reader.one_of(f"{key}.nn_reference", NN_REFERENCES),
            copy_detection=copy,
            feature_memorization=_memorization_from_dict(reader, f"{key}.feature_memorization"),
            features_normalised=reader.read(f"{key}.features_normalised", "bool"),
            memorization=_memorization_from_dict(reader, f"{key}.memorization"),
            images_per_prompt=images_per_prompt,
            prompt_file=reader.read(f"{key}.prompt_file", "str?"),
            timings={name: float(value) for name, value in timings.items()},
            **clip,
        )


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
        protocol (`dict[str, ProtocolReport]`, *optional*): the prompt-set protocol of
            :func:`~diffusers_hold.audit.audit_prompt_set`, one section per inference-time mitigation (``"none"``:
            without), in the order they ran; `None` for an audit without it (then ``report.json`` has no
            ``protocol`` key, as before). With it, ``memorization``, ``quality`` and ``prompts`` describe the first
            variant.
    """

    memorization: MemorizationReport
    quality: QualityReport | None
    pipeline_class: str
    prompts: list[str] | None
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    protocol: dict[str, ProtocolReport] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump`` (per-sample memorization values included; the ``protocol`` key only
        when the prompt-set protocol ran)."""
        out = {
            "format_version": REPORT_FORMAT_VERSION,
            "pipeline_class": self.pipeline_class,
            "settings": self.settings,
            "memorization": self.memorization.to_dict(per_sample=True),
            "quality": None if self.quality is None else self.quality.to_dict(),
            "prompts": self.prompts,
            "files": self.files,
        }
        if self.protocol is not None:
            out["protocol"] = {name: section.to_dict() for name, section in self.protocol.items()}
        return out

    def to_markdown(self) -> str:
        """The summary as Markdown (a model card section)."""
        mem = self.memorization
        lines = [
            f"Audit of `{self.pipeline_class}`: {mem.num_generated} generations (seed {self.settings['seed']}) "
            f"against {mem.num_train} {self._nn_reference_noun()}.",
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
            f"generation against its nearest and second-nearest {self._nn_reference_noun()}.",
        ]
        if quality is not None:
            lines[-1] += (
                f" Quality: in the {quality.feature_dim} features of `{quality.feature_extractor}`, fitted on the "
                f"{quality.num_held_out} held-out images."
            )
        if self.protocol:
            lines += ["", *self._protocol_markdown()]
        return "\n".join(lines)

    def _nn_reference_noun(self) -> str:
        """What the 1/3 rule compared with: training images, or the reference images pooled (protocol without any
        training images)."""
        if self.protocol and next(iter(self.protocol.values())).nn_reference == "references":
            return "reference images (all prompts' pooled; no training images given)"
        return "training images"

    def _protocol_markdown(self) -> list[str]:
        """The prompt-set protocol's section: its setting, then the variants side by side."""
        variants = list(self.protocol.values())
        first = variants[0]
        copy = first.copy_detection
        kind = FEATURE_NAMES[first.features]
        level = f"{100 * copy.confidence:g}%"
        if first.images_per_prompt is None:
            groups = f"{copy.num_generated} generations (unconditional: each generation is its own prompt group)"
        else:
            groups = f"{len(copy.prompts)} prompts x {first.images_per_prompt} images"
        if first.references == "training":
            against = f"every training image ({copy.num_references})"
        else:
            against = f"its own prompt's reference images ({copy.num_references} in all)"
        lines = [
            "### Prompt-set protocol",
            "",
            f"{groups}, the same seeds for every variant, each generation compared with {against} by cosine "
            f"similarity in **{kind}** features (`{first.feature_extractor}`); a copy is a similarity > "
            f"{copy.threshold:g}. Intervals: {level} percentile bootstrap over prompts ({copy.n_bootstrap} "
            "resamples, the same for every variant).",
            "",
            "| metric | " + " | ".join(f"`{v.mitigation}`" for v in variants) + " |",
            "|---" * (len(variants) + 1) + "|",
        ]

        def row(label: str, cell) -> str:
            return f"| {label} | " + " | ".join(cell(v) for v in variants) + " |"

        def with_interval(value: float | None, interval: tuple[float, float] | None, digits: int = 4) -> str:
            if value is None:
                return "-"
            return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"

        def percent(value: float | None) -> str:
            return "-" if value is None else f"{value:.1%}"

        for label, name in (
            ("mean of per-prompt max similarity", "mean_max_similarity"),
            (f"mean of per-prompt top-{copy.top_k} mean", "mean_top_k"),
            (f"fraction of generations > {copy.threshold:g} (copies)", "fraction_copied"),
        ):
            reports = [v.copy_detection for v in variants]
            cells = [with_interval(getattr(r, name), getattr(r, f"{name}_interval")) for r in reports]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if any(v.clip_model is not None for v in variants):
            model = next(v.clip_model for v in variants if v.clip_model is not None)
            lines.append(
                row(
                    f"CLIP score (`{model}`)",
                    lambda v: with_interval(v.clip_score_mean, v.clip_score_interval, digits=2),
                )
            )
        lines.append(row(f"1/3 rule in {kind} features", lambda v: percent(v.feature_memorization.fraction_memorized)))
        if first.feature_memorization.held_out_fraction is not None:
            lines.append(
                row(
                    "same, held-out real images (control)", lambda v: percent(v.feature_memorization.held_out_fraction)
                )
            )
        lines.append(row("1/3 rule in pixel space", lambda v: percent(v.memorization.fraction_memorized)))
        vectors = "L2-normalised feature vectors" if first.features_normalised else "feature vectors as they are"
        lines += [
            "",
            f"The 1/3 rule in {kind} features is the pixel-space rule applied to the {vectors} (L2 distances; each "
            f"generation against its nearest and second-nearest {self._nn_reference_noun()}).",
        ]
        described = [v for v in variants if v.mitigation_settings.get("description")]
        if described:
            lines += ["", *(f"- `{v.mitigation}`: {v.mitigation_settings['description']}" for v in described)]
        return lines

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
        if self.protocol:
            # the unmitigated variant when there is one: the model as it is
            section = self.protocol.get("none") or next(iter(self.protocol.values()))
            copy = section.copy_detection
            where = f"{FEATURE_NAMES[section.features]}, mitigation {section.mitigation}"
            metrics += [
                {
                    "name": f"fraction of copies (cosine > {copy.threshold:g}, {where})",
                    "type": "copy_fraction",
                    "value": copy.fraction_copied,
                },
                {
                    "name": f"mean of per-prompt max similarity ({where})",
                    "type": "mean_max_similarity",
                    "value": copy.mean_max_similarity,
                },
            ]
            if section.clip_score_mean is not None:
                name = f"CLIP score ({section.clip_model}, mitigation {section.mitigation})"
                metrics.append({"name": name, "type": "clip_score", "value": section.clip_score_mean})
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
        protocol = _protocol_from_dict(reader, memorization.num_generated)
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
            protocol=protocol,
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


def _protocol_from_dict(reader: _ReportReader, num_generated: int) -> dict[str, ProtocolReport] | None:
    """The ``protocol`` sections, or `None` for a report without the protocol (a key absent or null)."""
    if reader.data.get("protocol") is None:
        return None
    sections = reader.read("protocol", "dict")
    if not sections:
        raise ValueError(f"{reader.source}: `protocol` is empty; it holds one section per variant.")
    protocol = {}
    for name in sections:
        if "." in name:
            raise ValueError(f"{reader.source}: `protocol` has a section named {name!r}; names have no dots.")
        section = ProtocolReport._read(reader, f"protocol.{name}")
        if section.mitigation != name:
            raise ValueError(f"{reader.source}: `protocol.{name}.mitigation` is {section.mitigation!r}, not {name!r}.")
        if section.copy_detection.num_generated != num_generated:
            raise ValueError(
                f"{reader.source}: `protocol.{name}` scores {section.copy_detection.num_generated} generations but "
                f"`memorization.num_generated` is {num_generated}."
            )
        protocol[name] = section
    return protocol
