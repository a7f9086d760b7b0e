"""Publish HOLD pipelines to the Hugging Face Hub so that they load in one line.

``pipe.save_pretrained(folder)`` records every diffusers-hold component under its module path, e.g.
``"scheduler": ["diffusers_hold.schedulers.scheduling_hold", "HOLDScheduler"]``, and a diffusers-hold pipeline class
by name, ``"_class_name": "HOLDPipeline"``. Such a folder loads locally after ``import diffusers_hold``, but not from
the Hub: ``DiffusionPipeline.download`` (diffusers 0.42.1) checks the repo's file list with
``_get_custom_components_and_folders``, which accepts a component only if its library is one diffusers loads from
(``LOADABLE_CLASSES``: diffusers, transformers, onnxruntime.training), a module of ``diffusers.pipelines``, or if the
repo holds the file ``<component>/<library>.py``; and ``_get_pipeline_class`` resolves a string ``_class_name`` with
``getattr(diffusers, name)``, which knows only diffusers' own pipelines unless ``diffusers_hold`` was imported.

:func:`save_for_hub` therefore writes diffusers' layout for custom components and custom pipelines::

    model_index.json               "_class_name": ["pipeline_hold", "HOLDPipeline"],
                                   "scheduler": ["scheduling_hold", "HOLDScheduler"],
                                   "unet": ["diffusers", "UNet2DModel"]          (stock components stay as saved)
    pipeline_hold.py               re-exports diffusers_hold.pipelines.pipeline_hold.HOLDPipeline
    scheduler/scheduling_hold.py   re-exports diffusers_hold.schedulers.scheduling_hold.HOLDScheduler
    scheduler/scheduler_config.json, unet/config.json, unet/diffusion_pytorch_model.safetensors
    README.md                      the model card (metadata: library_name diffusers, tags, the HOLD settings)

- A component whose class lives in ``diffusers_hold`` is recorded as ``[<module file name>, <class>]`` next to a
  shim ``<component>/<module file name>.py``. ``download`` then fetches the shim (its ``custom_components``), and
  ``from_pretrained(..., trust_remote_code=True)`` takes the class from it (``get_class_obj_and_candidates`` finds
  ``<component folder>/<library>.py`` and calls ``get_class_from_dynamic_module``).
- A pipeline class of ``diffusers_hold`` is recorded as ``[<module file name>, <class>]`` next to a root file
  ``<module file name>.py``, the community-pipeline layout: ``download`` turns a list ``_class_name`` into
  ``custom_pipeline`` and fetches ``<custom_pipeline>.py`` when the repo holds it; ``from_pretrained`` loads the
  class from it (``_resolve_custom_pipeline_and_cls``, ``_get_custom_pipeline_class``). A stock pipeline class (e.g.
  ``StableDiffusionPipeline`` with a HOLD UNet and scheduler) stays a name.

The shims hold no model code, only an import from the installed package (``pip install diffusers-hold``): the
published code cannot drift from the package, and the loaded objects are the package's own classes
(``type(pipe.scheduler) is diffusers_hold.HOLDScheduler``). All shims of one module share a file name and content,
because diffusers copies every local custom file into one flat ``diffusers_modules/local`` package.

Known limit of diffusers 0.42.1: for a root pipeline file of a Hub repo, ``get_cached_module_file`` calls
``model_info``, so once the repo's file listing is cached (after a first online download) a HOLDPipeline repo cannot
be reloaded by repo id with ``HF_HUB_OFFLINE=1``. Loading the snapshot folder works:
``DiffusionPipeline.from_pretrained(snapshot_download(repo_id), trust_remote_code=True)``. Repos of stock pipeline
classes (shimmed components only) have no such limit.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import yaml
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import (
    LOADABLE_CLASSES,
    _get_custom_components_and_folders,
    _get_ignore_patterns,
    filter_model_files,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.constants import REPOCARD_NAME
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from .utils import atomic_output

if TYPE_CHECKING:
    from .audit import AuditReport

__all__ = ["create_model_card", "push_to_hub", "save_for_hub", "validate_hub_folder"]

HOLD_PACKAGE = "diffusers_hold"
HOLD_DISTRIBUTION = "diffusers-hold"
MODEL_INDEX_NAME = DiffusionPipeline.config_name
BASE_TAGS = ("diffusers", HOLD_DISTRIBUTION, "hold")
# lists longer than this (e.g. ``trained_betas``) are summarised in the card's table; the metadata has them whole
MAX_TABLE_LIST_LENGTH = 8

SHIM_TEMPLATE = '''\
"""Re-exports {class_names} of the diffusers-hold package, which must be installed: pip install diffusers-hold

Written by diffusers_hold.hub.save_for_hub. diffusers imports this file when the pipeline is loaded with
`trust_remote_code=True`; it holds no model code of its own.
"""

try:
    from {module} import {class_names}
except ModuleNotFoundError as error:
    raise ImportError(
        f"This pipeline needs the diffusers-hold package: pip install diffusers-hold ({{error}})"
    ) from error

__all__ = {all_names}
'''

CALL_EXAMPLES = {
    "text-to-image": 'image = pipe("a photograph of an astronaut riding a horse").images[0]',
    "image-to-image": 'image = pipe("a photograph of an astronaut riding a horse", image=init_image).images[0]',
    "unconditional-image-generation": "image = pipe(batch_size=1).images[0]",
}


def _is_hold_module(module: str) -> bool:
    return module == HOLD_PACKAGE or module.startswith(HOLD_PACKAGE + ".")


def _shim_module_name(module: str) -> str:
    """The file name (without ``.py``) of the shim of a diffusers-hold module: its last dotted part."""
    return module.rsplit(".", 1)[-1]


def _hub_layout(pipeline_class: type, model_index: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The Hub ``model_index.json`` of a saved pipeline and its shim files (path in the repo -> Python source)."""
    hub_index = dict(model_index)
    # (key of model_index.json, folder of the shim in the repo, module, class): "_class_name" / "" for the pipeline
    hold_entries: list[tuple[str, str, str, str]] = []
    if _is_hold_module(pipeline_class.__module__):
        hold_entries.append(("_class_name", "", pipeline_class.__module__, pipeline_class.__name__))
    elif pipeline_class.__module__.split(".")[0] != "diffusers":
        raise ValueError(
            f"{pipeline_class.__name__} is defined in {pipeline_class.__module__}, outside diffusers and "
            f"{HOLD_DISTRIBUTION}: a Hub repo could only load it if its code were published too, which save_for_hub "
            "does not do."
        )
    for name, entry in model_index.items():
        # lists in model_index.json, tuples in pipeline.config
        if not name.startswith("_") and isinstance(entry, (list, tuple)) and isinstance(entry[0], str):
            if _is_hold_module(entry[0]):
                hold_entries.append((name, name, entry[0], entry[1]))

    classes_by_module: dict[str, list[str]] = {}
    for _, _, module, class_name in hold_entries:
        if class_name not in classes_by_module.setdefault(module, []):
            classes_by_module[module].append(class_name)
    modules_by_file_name: dict[str, str] = {}
    for module in classes_by_module:
        other = modules_by_file_name.setdefault(_shim_module_name(module), module)
        if other != module:
            # diffusers imports all shims into one flat package, so the two would replace each other
            raise ValueError(f"The modules {other} and {module} would need the same shim file name.")

    shims = {}
    for key, folder, module, class_name in hold_entries:
        shim_name = _shim_module_name(module)
        hub_index[key] = [shim_name, class_name]
        class_names = sorted(classes_by_module[module])
        shims[posixpath.join(folder, f"{shim_name}.py")] = SHIM_TEMPLATE.format(
            module=module, class_names=", ".join(class_names), all_names=json.dumps(class_names)
        )
    return hub_index, shims


def _json_ready(values: Mapping[str, Any]) -> dict[str, Any]:
    # YAML metadata takes plain types; configs are JSON-serializable (diffusers saves them as JSON), tuples -> lists
    return json.loads(json.dumps(dict(values)))


def _hold_settings(pipeline: DiffusionPipeline) -> dict[str, dict[str, Any]]:
    """The HOLD settings of a pipeline: component name -> the config values that define its HOLD process."""
    settings = {}
    for name, component in pipeline.components.items():
        if component is None or not _is_hold_module(type(component).__module__):
            continue
        if isinstance(component, SchedulerMixin):
            # a scheduler's registered __init__ arguments are its settings; leftover keys of a stock config are not
            parameters = inspect.signature(type(component).__init__).parameters
            values = {key: value for key, value in component.config.items() if key in parameters}
        else:
            # a model's config is mostly its architecture; the HOLD part is its ``hold_*`` keys
            values = {key: value for key, value in component.config.items() if key.startswith("hold_")}
        if values:
            settings[name] = _json_ready(values)
    return settings


def _pipeline_tag(pipeline: DiffusionPipeline) -> str:
    call_parameters = inspect.signature(type(pipeline).__call__).parameters
    if "prompt" not in call_parameters:
        return "unconditional-image-generation"
    return "image-to-image" if "image" in call_parameters else "text-to-image"


def _distribution(cls: type) -> str:
    """The package a class comes from, as users install it."""
    return HOLD_DISTRIBUTION if _is_hold_module(cls.__module__) else cls.__module__.split(".")[0]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _table_cell(value: Any) -> str:
    if isinstance(value, list) and len(value) > MAX_TABLE_LIST_LENGTH:
        return f"{len(value)} values (see the `hold` metadata)"
    return f"`{value if isinstance(value, str) else json.dumps(value)}`"


def _card_body(
    pipeline: DiffusionPipeline,
    settings: Mapping[str, Mapping[str, Any]],
    pipeline_tag: str,
    repo_id: str | None,
    extra_sections: Mapping[str, str],
) -> str:
    pipeline_class = type(pipeline)
    components = "\n".join(
        f"| `{name}` | `{type(component).__name__}` | {_distribution(type(component))} |"
        for name, component in pipeline.components.items()
        if component is not None
    )
    settings_rows = "\n".join(
        f"| `{component}` | `{key}` | {_table_cell(value)} |"
        for component, values in settings.items()
        for key, value in _flatten(values)
    )
    hold_files = sorted(_hub_layout(pipeline_class, pipeline.config)[1])
    version = importlib.metadata.version(HOLD_DISTRIBUTION)
    sections = [
        f"# {pipeline_class.__name__} with higher-order Langevin dynamics (HOLD)",
        f"A [diffusers](https://github.com/huggingface/diffusers) `{pipeline_class.__name__}` whose HOLD components "
        f"come from [{HOLD_DISTRIBUTION}](https://pypi.org/project/{HOLD_DISTRIBUTION}/). HOLD diffuses the data "
        "together with auxiliary blocks (velocity, acceleration, ...) under critically damped higher-order Langevin "
        "dynamics, with noise entering only the last block; sampling integrates the reverse-time process.",
        f"| Component | Class | Library |\n| --- | --- | --- |\n{components}",
        "## How to use",
        f'```bash\npip install "{HOLD_DISTRIBUTION}>={version}"\n```',
        "```python\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "<repo_id>"}", trust_remote_code=True)\n'
        f"{CALL_EXAMPLES[pipeline_tag]}\n```",
        "`trust_remote_code=True` lets diffusers import "
        + ", ".join(f"`{path}`" for path in hold_files)
        + f": each is a short shim that imports its class from the installed {HOLD_DISTRIBUTION} package and holds "
        "no model code. Weights are stored as safetensors.",
        "## HOLD settings",
        f"| Component | Setting | Value |\n| --- | --- | --- |\n{settings_rows}",
    ]
    for title, markdown in extra_sections.items():
        sections += [f"## {title}", markdown.strip()]
    return "\n\n".join(sections) + "\n"


def create_model_card(
    pipeline: DiffusionPipeline,
    *,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    extra_sections: dict[str, str] | None = None,
    repo_id: str | None = None,
    memorization_audit: AuditReport | None = None,
) -> ModelCard:
    """Build the model card (``README.md``) of a HOLD pipeline for the Hub, offline.

    The YAML metadata has ``library_name: diffusers``, ``pipeline_tag``, the tags ``diffusers``, ``diffusers-hold``,
    ``hold`` and the pipeline tag followed by `tags`, ``base_model`` and ``license`` when given, and under ``hold``
    the HOLD settings of each diffusers-hold component: every config argument of a scheduler (``order``, ``T``,
    ``L_inv``, ``aux_init_var``, ``solver``, ``prediction_type``, ``num_train_timesteps``, ...) and the ``hold_*``
    config keys of a model (``hold_order``, ``hold_parameterization``, ``hold_settings``). The body describes the
    pipeline, shows the one-line load with ``trust_remote_code=True``, tabulates the HOLD settings and ends with
    `extra_sections`.

    Args:
        pipeline ([`~diffusers.DiffusionPipeline`]):
            The pipeline to describe; at least one component must come from diffusers-hold.
        base_model (`str`, *optional*):
            Hub id of the model the pipeline was converted or fine-tuned from.
        license (`str`, *optional*):
            License identifier of the weights, e.g. `"apache-2.0"`.
        tags (`list[str]`, *optional*):
            Tags added after the default ones.
        extra_sections (`dict[str, str]`, *optional*):
            Section title -> Markdown, appended to the card in order (e.g. a memorization report).
        repo_id (`str`, *optional*):
            Hub id the card's loading snippet names; `"<repo_id>"` when not given.
        memorization_audit ([`~diffusers_hold.audit.AuditReport`], *optional*):
            A memorization audit: its summary becomes the section "Memorization audit" and its headline numbers the
            card's model-index metrics (``eval_results``).

    Returns:
        [`~huggingface_hub.ModelCard`]: the card; `card.save(path)` writes it.

    Raises:
        `ValueError`: if no component of the pipeline comes from diffusers-hold.
    """
    settings = _hold_settings(pipeline)
    if not settings:
        raise ValueError(
            f"{type(pipeline).__name__} has no component with HOLD settings from {HOLD_DISTRIBUTION}; publish it with "
            "`pipeline.push_to_hub` instead."
        )
    pipeline_tag = _pipeline_tag(pipeline)
    sections = dict(extra_sections or {})
    eval_results = None
    if memorization_audit is not None:
        sections["Memorization audit"] = memorization_audit.to_markdown()
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type="training-images",
                dataset_name="training images",
                metric_type=metric["type"],
                metric_name=metric["name"],
                metric_value=metric["value"],
            )
            for metric in memorization_audit.model_index_metrics()
        ]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        tags=[*BASE_TAGS, pipeline_tag, *(tags or [])],
        base_model=base_model,
        license=license,
        # the Hub's model-index needs a model name whenever there are evaluation results
        model_name=(repo_id or type(pipeline).__name__) if eval_results else None,
        eval_results=eval_results,
        hold=settings,
    )
    body = _card_body(pipeline, settings, pipeline_tag, repo_id, sections)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _refuse_to_overwrite(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it.")


def save_for_hub(
    pipeline: DiffusionPipeline,
    save_directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    extra_sections: dict[str, str] | None = None,
    repo_id: str | None = None,
    memorization_audit: AuditReport | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a HOLD pipeline in a layout that loads from the Hub in one line, with its model card.

    After uploading the folder (:func:`push_to_hub`), ``DiffusionPipeline.from_pretrained(repo_id,
    trust_remote_code=True)`` rebuilds the pipeline wherever diffusers-hold is installed, without ``import
    diffusers_hold``. The pipeline is saved with ``save_pretrained(..., safe_serialization=True)``; then every
    diffusers-hold class gets a shim file and its ``model_index.json`` entry names the shim (see the module
    docstring), ``README.md`` is the card of :func:`create_model_card`, and :func:`validate_hub_folder` checks the
    result. Everything is written to a hidden sibling folder renamed to `save_directory` at the end, so a failure
    leaves no half-written folder behind.

    Args:
        pipeline ([`~diffusers.DiffusionPipeline`]):
            A `HOLDPipeline`, or a stock diffusers pipeline with diffusers-hold components (e.g. a
            `StableDiffusionPipeline` with a `HOLDUNet2DConditionModel` and a `HOLDScheduler`).
        save_directory (`str` or `os.PathLike`):
            Folder to create; it may exist only if empty, unless `overwrite=True`.
        base_model (`str`, *optional*), license (`str`, *optional*), tags (`list[str]`, *optional*),
            extra_sections (`dict[str, str]`, *optional*), repo_id (`str`, *optional*), memorization_audit
            ([`~diffusers_hold.audit.AuditReport`], *optional*):
            Passed to :func:`create_model_card`.
        overwrite (`bool`, defaults to `False`):
            Replace the content of a non-empty `save_directory` (only once the new folder is complete).

    Returns:
        `pathlib.Path`: `save_directory`.

    Raises:
        `FileExistsError`: if `save_directory` is a file, or a non-empty folder and `overwrite` is `False`.
        `ValueError`: if the pipeline has no diffusers-hold component, or its class is neither diffusers' nor
            diffusers-hold's, or the saved folder fails :func:`validate_hub_folder`.
    """
    target = Path(save_directory)
    _refuse_to_overwrite(target, overwrite)
    card = create_model_card(
        pipeline,
        base_model=base_model,
        license=license,
        tags=tags,
        extra_sections=extra_sections,
        repo_id=repo_id,
        memorization_audit=memorization_audit,
    )
    with atomic_output(target) as staging:
        staging.mkdir()
        pipeline.save_pretrained(staging, safe_serialization=True)
        model_index_path = staging / MODEL_INDEX_NAME
        hub_index, shims = _hub_layout(type(pipeline), json.loads(model_index_path.read_text(encoding="utf-8")))
        # the format of diffusers' ConfigMixin.to_json_string
        model_index_path.write_text(json.dumps(hub_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for relative_path, source in shims.items():
            (staging / relative_path).write_text(source, encoding="utf-8")
        card.save(staging / REPOCARD_NAME)
        validate_hub_folder(staging)
        _refuse_to_overwrite(target, overwrite)  # again: something may have appeared while the pipeline was saved
    return target


def _read_model_index(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_INDEX_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {MODEL_INDEX_NAME}; save the pipeline with save_for_hub.")
    try:
        model_index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(model_index, dict) or "_class_name" not in model_index:
        raise ValueError(f"{path} is not a pipeline index: it has no `_class_name`.")
    return model_index


def _repo_filenames(folder: Path) -> set[str]:
    """The paths in the repo of the files that `upload_folder` would upload, as the Hub lists them."""
    paths = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return set(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _check_shim(folder: Path, relative_path: str, class_name: str, owner: str) -> None:
    path = folder / relative_path
    if not path.is_file():
        raise ValueError(
            f"{owner} needs the file {relative_path} for the Hub, and {folder} lacks it; save with save_for_hub."
        )
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        raise ValueError(f"{path} is not valid Python: {error}") from error
    bound = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    bound |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    if class_name not in bound:
        raise ValueError(f"{relative_path} neither imports nor defines {class_name}, which {owner} needs.")


def _check_classes(folder: Path, model_index: Mapping[str, Any]) -> None:
    """Every class that diffusers does not ship must come with the file it is loaded from."""
    pipeline_class_name = model_index["_class_name"]
    if isinstance(pipeline_class_name, list):
        module, class_name = pipeline_class_name
        _check_shim(folder, f"{module}.py", class_name, f"The pipeline class [{module!r}, {class_name!r}]")
    else:
        # in this process diffusers may know HOLDPipeline because diffusers_hold registered it; a fresh one does not
        pipeline_class = getattr(diffusers, pipeline_class_name, None)
        if pipeline_class is None or pipeline_class.__module__.split(".")[0] != "diffusers":
            raise ValueError(
                f"The pipeline class {pipeline_class_name!r} of {MODEL_INDEX_NAME} is not one of diffusers' own; a "
                "Hub repo must name it as [<module>, <class>] next to <module>.py; save with save_for_hub."
            )
    pipelines = diffusers.pipelines
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        if library in LOADABLE_CLASSES or hasattr(pipelines, library):
            continue
        if "." in library:
            raise ValueError(
                f"Component {name!r} is recorded as [{library!r}, {class_name!r}] by save_pretrained; diffusers loads "
                f"it from the Hub only from a file {name}/<module>.py named in {MODEL_INDEX_NAME}; save with "
                "save_for_hub."
            )
        _check_shim(folder, f"{name}/{library}.py", class_name, f"Component {name!r}")


def _check_model_card(folder: Path) -> None:
    path = folder / REPOCARD_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {REPOCARD_NAME} model card.")
    try:
        card = ModelCard.load(path)  # a Path, never a repo id: no download
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"The metadata of the model card {path} does not parse: {error}") from error
    if card.data.get("library_name") != "diffusers":
        raise ValueError(
            f"The model card {path} must set `library_name: diffusers` in its metadata (the Hub shows the diffusers "
            f"loading snippet from it); it has {card.data.get('library_name')!r}."
        )


def _check_hub_download(folder: Path, model_index: Mapping[str, Any], filenames: set[str]) -> None:
    """Run the file-list checks of ``DiffusionPipeline.download`` (diffusers 0.42.1) for a Hub repo on `folder`."""
    config = dict(model_index)
    filenames = filenames - set(config.pop("_ignore_files", []))
    try:
        # raises for a component whose library diffusers cannot import and whose <component>/<library>.py is missing
        _, folder_names = _get_custom_components_and_folders(str(folder), config, filenames)
        model_folder_names = {
            os.path.split(path)[0] for path in filter_model_files(filenames) if os.path.split(path)[0] in folder_names
        }
        # download(..., use_safetensors=True) raises here when a model component has no safetensors weights; the
        # default download would fall back to pickled .bin weights, which HOLD repos never need. is_onnx only changes
        # which files are skipped.
        _get_ignore_patterns(
            passed_components=[],
            model_folder_names=model_folder_names,
            model_filenames=filenames,
            use_safetensors=True,
            allow_pickle=False,
            use_onnx=None,
            is_onnx=False,
            use_flashpack=False,
        )
    except (ValueError, OSError) as error:
        raise ValueError(f"diffusers would refuse to download {folder} from the Hub: {error}") from error
    # download() then resolves the pipeline class; a list `_class_name` loads <module>.py only if the repo lists it
    # (`load_pipe_from_hub`), else diffusers looks the name up among GitHub community pipelines. Resolving it for real
    # needs the network (`model_info`), so the file's presence and content are checked by _check_classes instead.


def validate_hub_folder(folder: str | os.PathLike) -> None:
    """Check offline that a folder will load from the Hub with ``DiffusionPipeline.from_pretrained(repo_id,
    trust_remote_code=True)``.

    Checks, in order: ``model_index.json`` exists and parses; a pipeline class that is not diffusers' own is named as
    ``[<module>, <class>]`` next to a root ``<module>.py`` that imports or defines it; every component from a library
    diffusers does not load (neither diffusers, transformers nor onnxruntime.training) has its shim
    ``<component>/<library>.py`` that imports or defines its class; the ``README.md`` metadata parses and has
    ``library_name: diffusers``; and the checks ``DiffusionPipeline.download`` makes on a Hub repo's file list
    before downloading, run with diffusers' own functions (``_get_custom_components_and_folders``, and
    ``_get_ignore_patterns`` as with ``use_safetensors=True``) on the files the Hub would list. No code from the
    folder is executed.

    Args:
        folder (`str` or `os.PathLike`):
            The folder to check, e.g. written by :func:`save_for_hub`.

    Raises:
        `ValueError`: naming the first problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    model_index = _read_model_index(folder)
    _check_classes(folder, model_index)
    _check_model_card(folder)
    _check_hub_download(folder, model_index, _repo_filenames(folder))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload HOLD pipeline",
    revision: str | None = None,
) -> str:
    """Upload a folder written by :func:`save_for_hub` to a Hub model repo, creating the repo if needed.

    The repo id and the folder (:func:`validate_hub_folder`) are checked before anything touches the network.

    Args:
        folder (`str` or `os.PathLike`):
            The folder to upload.
        repo_id (`str`):
            `"user/name"` of the model repo.
        token (`str`, *optional*):
            Hub token; the stored login (`hf auth login`) when not given.
        private (`bool`, *optional*):
            Visibility of a newly created repo; the account's default when not given. An existing repo keeps its own.
        commit_message (`str`, defaults to `"Upload HOLD pipeline"`):
            Message of the upload commit.
        revision (`str`, *optional*):
            Branch to commit to, created from `main` if missing; `main` when not given.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: if `repo_id` is not a valid repo id or the folder fails :func:`validate_hub_folder`.
    """
    validate_repo_id(repo_id)
    validate_hub_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )
    return commit.commit_url
