"""Score Distillation Sampling (DreamFusion 2022): the one SDS loss for every guidance model.

For a rendered image x (pixels in [-1, 1], or a latent model's latents), a timestep t
and noise eps, the frozen model predicts the noise of x_t = sqrt(a_t) x + sqrt(1 - a_t) eps
with and without the prompt; classifier-free guidance combines the two into eps_hat, and
the SDS gradient on x is w(t) (eps_hat - eps). The loss is built so that its gradient with
respect to x is exactly that (the UNet Jacobian is skipped, as in the paper).

The guidance model contract (`guidance.registry.Guidance`, docs/ARCHITECTURE.md): encode_prompt, predict_noise, alphas_cumprod,
space, resolution, encode_images (latent models), default_guidance_scale and
view_dependent_uncond. The model keeps its text encoder: every stage and every later run
embeds its prompts through the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.view_words import ALL_VIEW_WORDS, banded_view_word, view_words_of

VIEW_SUFFIXES = {word: f", {word} view" for word in ALL_VIEW_WORDS}  # appended to the prompt per view word
T_ANNEAL_MODES = ("none", "linear", "sqrt")
WEIGHTINGS = ("sds", "uniform", "fantasia3d")
_TINY = 1e-12  # keeps the Perp-Neg projection finite when the positive direction is zero


class NonFiniteError(FloatingPointError):
    """NaN or inf in the SDS computation; the message says where and at which timesteps."""


@dataclass
class SDSConfig:
    guidance_scale: float | None = None  # classifier-free guidance scale s; None = the model's default_guidance_scale
    guidance_scale_end: float | None = None  # s at the end of training, linear in progress from guidance_scale; None = constant
    texture_guidance_scale: float | None = None  # CFG scale of the gradient the albedo / texture gets (coarse and refine route it); None = s
    t_min: float = 0.02  # lowest timestep, fraction of the schedule length T
    t_max: float = 0.98  # highest timestep at the start of training, fraction of T
    t_anneal: str = "none"  # how the highest timestep moves with progress: "none", "linear", "sqrt" (HiFA)
    t_max_end: float = 0.5  # highest timestep at progress 1 when annealing, fraction of T
    weighting: str = "sds"  # w(t): "sds" = 1 - a_t, "uniform" = 1, "fantasia3d" = sqrt(a_t) (1 - a_t)
    view_dependent: bool = True  # append ", <view> view" to the prompt of each image
    negative_prompt: str = ""  # text of the unconditional branch of classifier-free guidance
    perp_neg: bool = False  # Perp-Neg (Armandpour 2023): other views' prompts as negatives, perpendicular part only
    # Perp-Neg weights: threestudio's default decay curves evaluated at a pure front / side / back view.
    perp_neg_front_side: float = 1.574  # weight of the side prompt at front views and of the front prompt at side views
    perp_neg_back_front: float = 1.967  # weight of the front prompt at back views
    perp_neg_back_side: float = 0.394  # weight of the side prompt at back views
    grad_clip: float = 0.0  # clamp every element of the SDS gradient to [-grad_clip, grad_clip]; 0 = off
    pass_elevations: bool | None = None  # give a model that takes the cameras' elevations (the primitives prior) each image's; None = yes

    def check(self) -> None:
        """Raise ValueError naming the first field out of its range."""
        if self.guidance_scale is not None and not self.guidance_scale > 0:
            raise ValueError(f"guidance_scale must be > 0 or None, got {self.guidance_scale}")
        if self.guidance_scale_end is not None and not self.guidance_scale_end > 0:
            raise ValueError(f"guidance_scale_end must be > 0 or None, got {self.guidance_scale_end}")
        if self.texture_guidance_scale is not None and not self.texture_guidance_scale > 0:
            raise ValueError(f"texture_guidance_scale must be > 0 or None, got {self.texture_guidance_scale}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"t_min and t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.t_anneal not in T_ANNEAL_MODES:
            raise ValueError(f"t_anneal must be one of {list(T_ANNEAL_MODES)}, got {self.t_anneal!r}")
        if not self.t_min <= self.t_max_end <= 1.0:
            raise ValueError(f"t_max_end must be in [t_min={self.t_min}, 1], got {self.t_max_end}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a str, got {type(self.negative_prompt).__name__}")
        if self.pass_elevations is not None and not isinstance(self.pass_elevations, bool):
            raise ValueError(f"pass_elevations must be True, False or None, got {self.pass_elevations!r}")
        if self.perp_neg and not self.view_dependent:
            raise ValueError("perp_neg=True needs view_dependent=True (its negatives are the other views' prompts)")
        for name in ("perp_neg_front_side", "perp_neg_back_front", "perp_neg_back_side", "grad_clip"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


def t_max_at(config: SDSConfig, progress: float) -> float:
    """The highest timestep (fraction of T) after `progress` (0..1) of training."""
    if config.t_anneal == "none":
        return config.t_max
    ramp = progress if config.t_anneal == "linear" else math.sqrt(progress)
    return config.t_max + (config.t_max_end - config.t_max) * ramp


def timestep_weight(
    weighting: str,  # one of WEIGHTINGS
    alpha_bar: Tensor,  # [...] cumulative alpha of the sampled timesteps
) -> Tensor:  # [...] w(t)
    """w(t) of DreamFusion ("sds"), constant ("uniform") or Fantasia3D's sqrt(a) (1 - a)."""
    if weighting == "sds":
        return 1.0 - alpha_bar
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    if weighting == "fantasia3d":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")


def perpendicular_component(
    a: Tensor,  # [N, ...]
    b: Tensor,  # [N, ...]
) -> Tensor:  # [N, ...] the part of each a[i] orthogonal to b[i]
    dims = tuple(range(1, a.dim()))
    dot = (a * b).sum(dim=dims, keepdim=True)
    norm2 = (b * b).sum(dim=dims, keepdim=True).clamp_min(_TINY)
    return a - dot / norm2 * b


def perp_neg_negatives(config: SDSConfig) -> dict[str, list[tuple[str, float]]]:
    """For each view word, the other view words used as Perp-Neg negatives and their weights."""
    table = {
        "front": [("side", config.perp_neg_front_side)],
        "side": [("front", config.perp_neg_front_side)],
        "back": [("front", config.perp_neg_back_front), ("side", config.perp_neg_back_side)],
        "overhead": [],  # no opposing view: plain classifier-free guidance
    }
    return {word: [(neg, w) for neg, w in negs if w > 0] for word, negs in table.items()}


def _randint(low: int, high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Integers in [low, high), drawn on the generator's device so a CPU generator seeds CUDA runs too."""
    source = generator.device if generator is not None else device
    return torch.randint(low, high, (n,), generator=generator, device=source).to(device)


def _randn(shape: torch.Size, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


class SDSLoss:
    """SDS for one prompt and one guidance model; text embeddings are computed once, here."""

    def __init__(self, guidance, prompt: str, config: SDSConfig | None = None):
        config = config if config is not None else SDSConfig()
        config.check()
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
        if guidance.space not in ("pixel", "latent"):
            raise ValueError(f"guidance.space must be 'pixel' or 'latent', got {guidance.space!r}")
        self.guidance = guidance
        self.prompt = prompt
        self.config = config
        scale = config.guidance_scale if config.guidance_scale is not None else guidance.default_guidance_scale
        self.guidance_scale = float(scale)
        self.alphas_cumprod = guidance.alphas_cumprod.detach().float()  # [T]
        self.num_timesteps = self.alphas_cumprod.shape[0]
        self.view_dependent_uncond = bool(guidance.view_dependent_uncond) and config.view_dependent
        self.negatives = perp_neg_negatives(config)
        # A model that tells elevation bands apart (the primitives prior) says where its "low" and "high" views start.
        self.view_bands = getattr(guidance, "view_bands", None) if config.view_dependent else None
        self.view_words = view_words_of(self.view_bands)
        # A model that takes the cameras' elevations (the primitives prior) gets them with every call,
        # unless this stage's config says not to.
        self.takes_elevations = bool(getattr(guidance, "takes_elevations", False)) and config.pass_elevations is not False

        # 1. Texts: one per view word (or just the prompt), and the unconditional ones.
        negative = config.negative_prompt
        if config.view_dependent:
            self.cond_texts = [prompt + VIEW_SUFFIXES[word] for word in self.view_words]
        else:
            self.cond_texts = [prompt]
        if self.view_dependent_uncond:
            self.uncond_texts = [negative + VIEW_SUFFIXES[word] for word in self.view_words]
        else:
            self.uncond_texts = [negative]

        # 2. Embed them all in one call (the model caches them: the next stage reuses them).
        with torch.no_grad():
            embeddings = guidance.encode_prompt(self.cond_texts + self.uncond_texts)
        n_cond = len(self.cond_texts)
        self.cond_embeddings = embeddings[:n_cond].detach()  # [4 or 1, ...]
        self.uncond_embeddings = embeddings[n_cond:].detach()  # [4 or 1, ...]

    def scale_at(self, progress: float) -> float:
        """The classifier-free guidance scale after `progress` (0..1) of training."""
        end = self.config.guidance_scale_end
        if end is None:
            return self.guidance_scale
        return self.guidance_scale + (end - self.guidance_scale) * progress

    def t_range(self, progress: float) -> tuple[int, int]:
        """The inclusive integer range [lo, hi] of timesteps sampled at `progress`."""
        count = self.num_timesteps
        lo = min(max(round(self.config.t_min * count), 0), count - 1)
        hi = min(max(round(t_max_at(self.config, progress) * count), lo), count - 1)
        return lo, hi

    def sample_timesteps(self, batch: int, progress: float, generator: torch.Generator | None, device) -> Tensor:
        """Integer timesteps [batch], uniform in t_range(progress)."""
        lo, hi = self.t_range(progress)
        return _randint(lo, hi + 1, batch, generator, torch.device(device))

    def __call__(
        self,
        images: Tensor,  # [B, H, W, 3] in [0, 1], differentiable renders
        view_words: list[str],  # [B] one of VIEW_WORDS per image (or of `self.view_words`)
        progress: float = 0.0,  # fraction of training done, 0..1, for timestep annealing
        generator: torch.Generator | None = None,  # seeds timesteps and noise
        elevations: Tensor | list[float] | None = None,  # [B] the cameras' elevations, degrees: banded views for a model that has them
        texture_images: Tensor | None = None,  # [B, H, W, 3] images' values through the texture's own graph (coarse stage)
    ) -> tuple[Tensor, dict]:
        """(loss, info): d loss / d x == w(t) (eps_hat - eps); info has "t" [B], "grad_norm", "w" [B], "noise",
        and "texture_loss": None, or with `texture_guidance_scale` a loss whose gradient on x is the
        difference between the SDS gradient at that scale and at the shape's (for the texture's parameters),
        on `texture_images` where given (a render whose gradient reaches the texture alone), else on `images`."""
        # 1. Check inputs.
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")
        batch = images.shape[0]
        if len(view_words) != batch:
            raise ValueError(f"view_words must have one word per image ({batch}), got {len(view_words)}")
        unknown = [word for word in view_words if word not in self.view_words]
        if unknown:
            raise ValueError(f"view_words must be in {list(self.view_words)}, got {unknown}")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        if elevations is not None:
            elevations = [float(e) for e in (elevations.tolist() if isinstance(elevations, Tensor) else elevations)]
            if len(elevations) != batch:
                raise ValueError(f"elevations must have one value per image ({batch}), got {len(elevations)}")
            view_words = [banded_view_word(w, e, self.view_bands) for w, e in zip(view_words, elevations)]

        if texture_images is not None and texture_images.shape != images.shape:
            raise ValueError(f"texture_images must have the images' shape {tuple(images.shape)}, got {tuple(texture_images.shape)}")

        # 2. The tensor the model diffuses: pixels in [-1, 1] or latents, at the model's resolution.
        x = self._model_input(images)

        # 3. Noise the input at random timesteps.
        t = self.sample_timesteps(batch, progress, generator, x.device)  # [B]
        noise = _randn(x.shape, generator, x.device, x.dtype)  # [B, C, h, w]
        alpha_bar = self.alphas_cumprod.to(x.device)[t].view(batch, 1, 1, 1)
        with torch.no_grad():
            x_t = alpha_bar.sqrt() * x.detach() + (1.0 - alpha_bar).sqrt() * noise
            eps_uncond, direction = self._guidance_terms(x_t, t, view_words, elevations)  # [B, C, h, w] each

        # 4. The SDS gradient, and a loss whose gradient on x is exactly that.
        w = timestep_weight(self.config.weighting, alpha_bar)  # [B, 1, 1, 1]
        grad = self._gradient(w, eps_uncond + self.scale_at(progress) * direction, noise, t)
        loss = (grad.detach() * x).sum()
        texture_loss = None
        if self.config.texture_guidance_scale is not None:
            texture_grad = self._gradient(w, eps_uncond + self.config.texture_guidance_scale * direction, noise, t)
            x_texture = x if texture_images is None else self._model_input(texture_images)
            texture_loss = ((texture_grad - grad).detach() * x_texture).sum()
        info = {"t": t, "grad_norm": float(grad.norm()), "w": w.flatten(), "noise": noise, "texture_loss": texture_loss}
        return loss, info

    def _model_input(self, images: Tensor) -> Tensor:  # [B, H, W, 3] in [0, 1] -> [B, C, h, w]
        """Pixels in [-1, 1] or latents, at the model's resolution: the tensor the model diffuses."""
        guidance = self.guidance
        size = guidance.resolution
        pixels = images.permute(0, 3, 1, 2)  # [B, 3, H, W]
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        if guidance.space == "latent":
            x = guidance.encode_images(pixels).float()  # [B, C, h, w]
            where = "latents"
        else:
            x = pixels.float() * 2.0 - 1.0  # [B, 3, size, size]
            where = "input image"
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"non-finite values in the {where} before noising")
        return x

    def _gradient(self, w: Tensor, eps_hat: Tensor, noise: Tensor, t: Tensor) -> Tensor:  # [B, C, h, w]
        grad = w * (eps_hat - noise)
        if self.config.grad_clip > 0:
            grad = grad.clamp(-self.config.grad_clip, self.config.grad_clip)
        if not torch.isfinite(grad).all():
            raise NonFiniteError(f"non-finite SDS gradient at t={t.tolist()}")
        return grad

    def _guidance_terms(
        self,
        x_t: Tensor,  # [B, C, h, w] noisy input
        t: Tensor,  # [B] timesteps
        view_words: list[str],  # [B]
        elevations: list[float] | None = None,  # [B] degrees: passed on to a model that `takes_elevations`
    ) -> tuple[Tensor, Tensor]:  # eps_uncond, direction [B, C, h, w]: CFG's eps_hat = eps_uncond + s * direction
        batch = x_t.shape[0]
        if self.config.view_dependent:
            cond_index = [self.view_words.index(word) for word in view_words]
        else:
            cond_index = [0] * batch
        uncond_index = cond_index if self.view_dependent_uncond else [0] * batch

        # Perp-Neg negatives: one extra row per (image, negative view word) pair.
        rows, neg_index, neg_weights = [], [], []
        if self.config.perp_neg:
            for row, word in enumerate(view_words):
                band, _, base = word.rpartition(" ")  # "low front" -> ("low", "front"); "front" -> ("", "front")
                for neg_word, weight in self.negatives[base]:
                    rows.append(row)
                    neg_index.append(self.view_words.index(f"{band} {neg_word}".strip()))  # the same band
                    neg_weights.append(weight)

        # One model call on [cond, uncond, negatives].
        inputs = [x_t, x_t, x_t[rows]]
        steps = [t, t, t[rows]]
        conds = [self.cond_embeddings[cond_index], self.uncond_embeddings[uncond_index], self.cond_embeddings[neg_index]]
        extra = {}
        if elevations is not None and self.takes_elevations:  # every row is seen from its own image's camera
            elevation = torch.tensor(elevations, dtype=torch.float64, device=x_t.device)
            extra["elevations"] = torch.cat([elevation, elevation, elevation[rows]])
        eps = self.guidance.predict_noise(torch.cat(inputs), torch.cat(steps), torch.cat(conds), **extra).to(x_t.dtype)
        if not torch.isfinite(eps).all():
            raise NonFiniteError(f"non-finite noise prediction from the guidance model at t={t.tolist()}")
        eps_cond, eps_uncond, eps_neg = eps[:batch], eps[batch : 2 * batch], eps[2 * batch :]

        direction = eps_cond - eps_uncond  # [B, C, h, w]
        if rows:
            row_index = torch.tensor(rows, device=x_t.device)
            weights = torch.tensor(neg_weights, device=x_t.device, dtype=x_t.dtype).view(-1, 1, 1, 1)
            perp = perpendicular_component(eps_neg - eps_uncond[row_index], direction[row_index])
            direction = direction.index_add(0, row_index, -weights * perp)
        return eps_uncond, direction
