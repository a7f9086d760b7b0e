"""Memorization audit of a pipeline: generate, compare with the training images, write a report people can read.

:func:`audit_pipeline` takes any diffusers image pipeline (HOLD or stock, unconditional or text-to-image), the
training images and held-out real images, generates ``num_samples`` images (prompts: given, or the training
captions in turn), and measures

- memorization by the nearest-neighbour ratio (the 1/3 rule; :func:`~diffusers_hold.metrics.nn_ratio_memorization`),
  with the held-out images as the control (their memorized fraction should be ~0);
- quality without downloaded weights: Fréchet distance and k-NN precision / recall in a PCA space fitted on the
  held-out images, with the train-vs-held-out floor (:func:`~diffusers_hold.metrics.quality_report`).

It writes ``report.json`` (everything, per sample; :meth:`AuditReport.load` reads it back), ``report.md`` (the
summary; also the model card section of :func:`diffusers_hold.hub.create_model_card`), ``copies.png`` (the generations
closest to being copies, each beside its nearest training image) and ``ratio_histogram.png`` (the ratios of
generations and of held-out images, with the threshold). ``diffusers-hold audit`` is the command-line form.

An audit that samples worse than the model is used under-reports copying (noisy generations are far from
everything), so by default it samples with the step count the pipeline is meant to run at
(:func:`default_num_inference_steps`: what a :class:`~diffusers_hold.HOLDScheduler` recommends for its solver, else
the pipeline's own default), and the report records the steps, where they came from and the scheduler's settings.

:func:`audit_prompt_set` is the prompt-set protocol of the text-to-image memorization papers: ``images_per_prompt``
generations per prompt of a prompt file (:func:`read_prompt_file`, :class:`PromptSet`), each scored against its
prompt's reference images or the training images by cosine similarity in PCA, DINOv2, CLIP or SSCD features (per
prompt: max, top-3 mean, fraction of copies; overall: their means with bootstrap intervals), with the CLIP score and
the 1/3 rule in the same feature space, once per inference-time mitigation (:data:`INFERENCE_MITIGATIONS`) on the same
prompts and seeds. Each variant is a :class:`ProtocolReport` in the report.
"""

from .prompts import PromptSet, load_reference_images, read_prompt_file
from .protocol import audit_prompt_set
from .report import REPORT_FORMAT_VERSION, AuditReport, ProtocolReport
from .run import audit_pipeline, check_output_dir, default_num_inference_steps, generate_images, is_text_conditional
from .variants import INFERENCE_MITIGATIONS

__all__ = [
    "INFERENCE_MITIGATIONS",
    "REPORT_FORMAT_VERSION",
    "AuditReport",
    "PromptSet",
    "ProtocolReport",
    "audit_pipeline",
    "audit_prompt_set",
    "check_output_dir",
    "default_num_inference_steps",
    "generate_images",
    "is_text_conditional",
    "load_reference_images",
    "read_prompt_file",
]
