"""What a local model folder must be for a loader: its family (model_index.json's pipeline class) and
its tokenizer's files, checked before anything loads; and what counts as a path rather than a hub id.

A folder of another family (an IF folder given to the Stable Diffusion loader, an SDXL folder) or a
tokenizer folder without a vocabulary would otherwise fail deep inside from_pretrained, or not at all
until the first prompt, with a message that names neither.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from guidance.hub import GuidanceLoadError


@dataclass(frozen=True)
class Family:
    """What a loader accepts of a local folder: its pipeline classes and its tokenizer's files."""

    name: str  # how messages name it, e.g. "Stable Diffusion 1.x/2.x"
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s whose weights this loader can use
    tokenizer_files: tuple[tuple[str, ...], ...]  # each a set of files that is enough for the tokenizer


# model_index.json `_class_name` -> what the folder holds, for the message that refuses it.
KNOWN_PIPELINES = {
    "StableDiffusionPipeline": "a Stable Diffusion 1.x/2.x pipeline",
    "StableDiffusionImg2ImgPipeline": "a Stable Diffusion 1.x/2.x pipeline",
    "StableDiffusionInpaintPipeline": "a Stable Diffusion inpainting pipeline (its UNet takes 9 channels)",
    "StableDiffusionUpscalePipeline": "a Stable Diffusion upscaler",
    "StableDiffusionDepth2ImgPipeline": "a Stable Diffusion depth-to-image pipeline (its UNet takes 5 channels)",
    "StableDiffusionXLPipeline": "a Stable Diffusion XL pipeline",
    "StableDiffusionXLImg2ImgPipeline": "a Stable Diffusion XL pipeline",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 pipeline",
    "IFPipeline": "a DeepFloyd IF stage I pipeline",
    "IFImg2ImgPipeline": "a DeepFloyd IF stage I pipeline",
    "IFInpaintingPipeline": "a DeepFloyd IF stage I pipeline",
    "IFSuperResolutionPipeline": "a DeepFloyd IF stage II (super-resolution) pipeline",
}
# Which guidance takes a folder of these classes: the advice of a wrong-family error.
GUIDANCE_FOR_PIPELINE = {
    "StableDiffusionPipeline": "stable-diffusion", "StableDiffusionImg2ImgPipeline": "stable-diffusion",
    "IFPipeline": "deepfloyd-if", "IFImg2ImgPipeline": "deepfloyd-if", "IFInpaintingPipeline": "deepfloyd-if",
}


def looks_like_path(model_id: str) -> bool:
    """Whether `model_id` was meant as a local folder rather than a hub id ('owner/name'):
    it starts with / . ~, has a drive, or holds more than one path separator."""
    text = model_id.strip()
    separators = max(text.count(os.sep), text.count("/"))
    return text.startswith(("/", ".", "~")) or bool(os.path.splitdrive(text)[0]) or separators > 1


def expand_home(model_id: str) -> str:
    """'~/models/sd' -> the user's folder (from_pretrained does not expand it); anything else as given."""
    return os.path.expanduser(model_id) if model_id.startswith("~") else model_id


def no_such_folder_error(model_id: str, model_name: str) -> GuidanceLoadError:
    what = "it is a file, not a folder" if os.path.exists(model_id) else "no such folder"
    return GuidanceLoadError(
        f"could not load the {model_name} guidance model '{model_id}': {what}: {model_id}. What to do: check "
        f"the path (a folder saved with `pipeline.save_pretrained`), pass a hub id ('owner/name'), or use "
        f"`--guidance primitives` (the offline prior, no download)."
    )


def pipeline_class(folder: str) -> str | None:
    """The `_class_name` of a local folder's model_index.json; None when it has none (components saved one by one)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise GuidanceLoadError(f"could not read {path}: {exc}") from exc
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else None


def check_family(folder: str, model_name: str, family: Family) -> None:
    """GuidanceLoadError when the folder's model_index.json names a pipeline of another family."""
    found = pipeline_class(folder)
    if found is None or found in family.pipelines:
        return
    what = KNOWN_PIPELINES.get(found, f"a {found}")
    other = GUIDANCE_FOR_PIPELINE.get(found)
    advice = f"choose the {other} guidance for it" if other else "pass a folder of the expected kind"
    raise GuidanceLoadError(
        f"could not load the {model_name} guidance model '{folder}': the folder holds {what} "
        f"(model_index.json: {found}), expected {family.name} ({' or '.join(family.pipelines)}). "
        f"What to do: {advice}, or pass another folder or hub id."
    )


def check_tokenizer_folder(folder: str, model_name: str, family: Family) -> None:
    """GuidanceLoadError when tokenizer/ lacks every set of files its tokenizer can be built from
    (an empty one loads as a tokenizer without a vocabulary, which fails later with an unrelated message)."""
    path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(path):
        return  # missing_subfolders reports it
    present = set(os.listdir(path))
    if any(all(name in present for name in files) for files in family.tokenizer_files):
        return
    needed = " or ".join(" and ".join(files) for files in family.tokenizer_files)
    found = ", ".join(sorted(present)) if present else "nothing"
    raise GuidanceLoadError(
        f"could not load the {model_name} guidance model '{folder}': its tokenizer folder {path} has no "
        f"vocabulary: it needs {needed} (found: {found}). What to do: save the full pipeline there "
        f"(`pipeline.save_pretrained(folder)`), or pass another folder or hub id."
    )
