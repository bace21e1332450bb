"""The primitives prior: an exact, closed-form diffusion denoiser over libraries of renders.

For a prompt "a <color> <shape>, <view> view" the data distribution is the empirical one of
its library images x_i (see `primitive_shapes.py`). Given x_t = sqrt(a) x0 + sqrt(1 - a) e,
the posterior over which image was noised is softmax_i(-|x_t - sqrt(a) x_i|^2 / (2 (1 - a))),
so E[x0 | x_t] = sum_i softmax_i x_i exactly, and eps_hat = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a).
The unconditional branch (empty prompt plus a view word) is the union of every prompt's
library for that view word.

Besides x_t, t and the text, the model takes the camera's elevation e (degrees) where the caller
gives it (SDS does, for a model with `takes_elevations`): the prior over which render was noised is
then exp(-(e_i - e)^2 / (2 sigma^2)) for render i's elevation e_i, added to the logits above. With the
text alone (view words and elevation bands), a shape seen from one elevation passes for a distorted
one seen from a few degrees higher (a cone standing too low for the true one). The model never sees the
camera's azimuth, distance or field of view, so the object's size is only defined if the stages'
cameras all see it at one scale: the runs using this prior fix the camera distance and field of
view (`guidance.primitives_tuning.adapt_to_primitives`; every setting its runs tune, and why: docs/PRIMITIVES.md).

Images are factored as x_i = A_k + B_k * color (per channel, in [-1, 1]), with
A_k = 2 g (1 - alpha) - 1 for a grey background level g and B_k = 2 alpha_shade of render k, so
distances and posterior means for every color come from two matrix products per query instead
of materialising shapes x colors x renders images. The background is white (g = 1) except for
white objects, whose lit side would vanish into it: they get a dark one (`background_for`).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from guidance.primitive_shapes import (
    COLORS,
    PRIOR_AMBIENT,
    PRIOR_VIEW_WORDS,
    SHAPES,
    VIEW_BANDS,
    LibraryConfig,
    load_library,
    parse_prompt,
    prompt_text,
    render_elevations,
)
from renderers.cameras import VIEW_DISTANCE, VIEW_FOVY, CameraConfig

# The one camera distance and vertical field of view the runs with this prior use (see above).
CAMERA_DISTANCE = VIEW_DISTANCE  # world units
CAMERA_FOVY = VIEW_FOVY  # degrees
# Degrees: width of the camera-elevation kernel over the library's renders (0 = the text alone). The
# default library's 96 renders per view word put about 5 per degree in "front" (0 to 20 degrees); a
# smaller library gets a kernel of at least two of its renders' spacing there (`elevation_kernel`).
ELEVATION_SIGMA = 0.5
DARK_BACKGROUND = 0.15  # grey level behind white objects: below their darkest shade (0.3 ambient x 0.95)


def background_for(prompt: str | None) -> float:
    """The grey level behind the object for a prompt: white, except dark for white objects.

    On white, a white object's lit side looks like the background, and a semi-transparent grey
    cloud on its shadow side matches the library as well as the object does.
    """
    if prompt is None:
        return 1.0
    color, _, _ = parse_prompt(prompt)
    return DARK_BACKGROUND if color == "white" else 1.0


def elevation_kernel(renders_per_view: int) -> float:
    """The default width (degrees) of the camera-elevation kernel for a library of this many renders per
    view word: ELEVATION_SIGMA, or two of the renders' mean spacing in the "front" band if that is wider
    (with 32 renders, 1.25 degrees), so that the posterior still weighs a few renders at large t."""
    spacing = (VIEW_BANDS[1] - VIEW_BANDS[0]) / renders_per_view
    return max(ELEVATION_SIGMA, 2.0 * spacing)


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The standard DDPM linear schedule's cumulative products of alphas: [num_steps]."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def _check_background(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= 1.0:
        raise ValueError(f"background must be a grey level in [0, 1], got {level!r}")
    return float(level)


class PrimitivesPrior:
    """Offline pixel-space guidance model for prompts like 'a red cube' (no weights, no download)."""

    space = "pixel"
    # Both branches are exact posteriors, so CFG multiplies their whole difference: 100 saturates, 1 leaves a blob.
    default_guidance_scale = 5.0
    view_dependent_uncond = True  # the unconditional branch is per view word: SDS appends the view suffix
    view_bands = VIEW_BANDS  # elevation bands, degrees: SDS asks with "low <word>" under the first, "high <word>" from the second
    takes_elevations = True  # predict_noise takes the cameras' elevations (SDS passes them)

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        resolution: int = 64,  # library image side, px
        renders_per_view: int = 96,  # K renders per shape and view word
        flat_share: float = 0.0,  # share of the renders left unshaded (see LibraryConfig)
        camera: CameraConfig | None = None,  # the stages' camera distribution (the renders' poses are drawn from it)
        ambient: float = PRIOR_AMBIENT,  # ambient share of the library's Lambertian shading
        background: float = 1.0,  # grey level behind the objects in [0, 1]: the stages must render on the same
        cache: str | None = None,  # cache folder; None = the user cache folder
        elevation_sigma: float | None = None,  # degrees: the camera-elevation kernel's width; None = `elevation_kernel`; 0 = none
        log=print,
    ):
        self.background = _check_background(background)
        if elevation_sigma is None:
            elevation_sigma = elevation_kernel(renders_per_view)
        if isinstance(elevation_sigma, bool) or not isinstance(elevation_sigma, (int, float)) or not elevation_sigma >= 0:
            raise ValueError(f"elevation_sigma must be a number of degrees >= 0, got {elevation_sigma!r}")
        self.elevation_sigma = float(elevation_sigma)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype = dtype
        self.resolution = resolution
        self.library_config = LibraryConfig(
            resolution=resolution, renders_per_view=renders_per_view, ambient=ambient, flat_share=flat_share,
            camera=camera if camera is not None else CameraConfig(),
        )
        library = load_library(self.library_config, cache=cache, log=log)
        # Library tensors in float64: at small t the logits scale like 1 / (1 - a) and float32 cancels.
        # View-major layout, so that one view word's renders of every shape are contiguous.
        alpha = library["alpha"].to(self.device, torch.float64).flatten(-2).transpose(0, 1)  # [V, S, K, P]
        alpha_shade = library["alpha_shade"].to(self.device, torch.float64).flatten(-2).transpose(0, 1)
        # A_k = 2 g U_k - 1 with U_k = 1 - alpha: kept as U, so that any background level g is a
        # scalar in the formulas (`with_background`) rather than another copy of the library.
        self.lib_u = (1.0 - alpha).contiguous()  # [V, S, K, P]
        self.lib_b = (2.0 * alpha_shade).contiguous()  # [V, S, K, P]
        self.colors = torch.tensor(list(COLORS.values()), dtype=torch.float64, device=self.device)  # [C, 3]
        # Per-render sums over pixels [V, S, K], from which |x_k|^2 follows for any g and color.
        self.sums = {
            "u": self.lib_u.sum(-1), "uu": (self.lib_u**2).sum(-1), "ub": (self.lib_u * self.lib_b).sum(-1),
            "b": self.lib_b.sum(-1), "bb": (self.lib_b**2).sum(-1),
        }
        self._norm2 = {}  # background level -> [V, S, K, C]
        self.render_elevations = render_elevations(self.library_config).to(self.device)  # [V, K] degrees
        self.alphas_cumprod = ddpm_alphas_cumprod().to(self.device)  # [T]
        self.num_train_timesteps = self.alphas_cumprod.shape[0]

    def with_background(self, level: float) -> "PrimitivesPrior":
        """This prior for another background grey level, sharing the library (no copy, no reload)."""
        level = _check_background(level)
        if level == self.background:
            return self
        other = copy.copy(self)
        other.background = level
        return other

    @property
    def lib_a(self) -> Tensor:
        """A_k = 2 g (1 - alpha) - 1 for every render [V, S, K, P] (materialised: for inspection and tests)."""
        return 2.0 * self.background * self.lib_u - 1.0

    def lib_norm2(self) -> Tensor:
        """|A_k + B_k c|^2 over the 3 channels, for every render and color [V, S, K, C] at this background."""
        g = self.background
        if g not in self._norm2:  # shared by the priors `with_background` makes; a few KB per level
            s = self.sums
            aa = 4.0 * g * g * s["uu"] - 4.0 * g * s["u"] + self.lib_u.shape[-1]
            ab = 2.0 * g * s["ub"] - s["b"]
            c_sum, c_sq = self.colors.sum(-1), (self.colors**2).sum(-1)
            self._norm2[g] = 3.0 * aa[..., None] + 2.0 * c_sum * ab[..., None] + c_sq * s["bb"][..., None]
        return self._norm2[g]

    # ---- the guidance interface -------------------------------------------------------------
    def encode_prompt(self, texts: list[str]) -> Tensor:
        """Texts -> [N, 3] long: (shape index, color index, view index), -1 = any (unconditional / all views)."""
        rows = []
        for text in texts:
            color, shape, view = parse_prompt(text)
            rows.append(
                (
                    SHAPES.index(shape) if shape is not None else -1,
                    list(COLORS).index(color) if color is not None else -1,
                    PRIOR_VIEW_WORDS.index(view) if view is not None else -1,
                )
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def predict_noise(
        self,
        x_t: Tensor,  # [B, 3, R, R] noisy images in [-1, 1] space
        t: Tensor,  # [B] integer timesteps in [0, T)
        cond: Tensor,  # [B, 3] from encode_prompt
        elevations: Tensor | None = None,  # [B] the cameras' elevations, degrees; None = the text alone
    ) -> Tensor:
        """eps_hat [B, 3, R, R], exactly consistent with the posterior mean."""
        x0_hat = self.posterior_mean(x_t, t, cond, elevations)
        a = self.alphas_cumprod[t.long()].to(torch.float64).view(-1, 1, 1, 1)
        eps = (x_t.to(torch.float64) - a.sqrt() * x0_hat.to(torch.float64)) / (1.0 - a).sqrt()
        return eps.to(x_t.dtype)

    def posterior_mean(self, x_t: Tensor, t: Tensor, cond: Tensor, elevations: Tensor | None = None) -> Tensor:
        """E[x0 | x_t, prompt(, elevation)] [B, 3, R, R]."""
        self._check_images(x_t)
        if t.shape[0] != x_t.shape[0] or cond.shape[0] != x_t.shape[0]:
            raise ValueError(f"x_t, t and cond must share the batch size, got {x_t.shape[0]}, {t.shape[0]}, {cond.shape[0]}")
        if elevations is not None:
            elevations = torch.as_tensor(elevations, dtype=torch.float64).reshape(-1).tolist()
            if len(elevations) != x_t.shape[0]:
                raise ValueError(f"elevations must have one value per image ({x_t.shape[0]}), got {len(elevations)}")
        out = []
        for b in range(x_t.shape[0]):
            elevation = None if elevations is None else elevations[b]
            w_image, weights_b, u_sel, b_sel = self._posterior(x_t[b], int(t[b]), cond[b], elevation)
            mean_a = 2.0 * self.background * (w_image @ u_sel) - w_image.sum()  # sum_k w_k A_k, the same in every channel
            mean = mean_a[None] + weights_b @ b_sel  # [3, P]
            out.append(mean.view(3, self.resolution, self.resolution))
        return torch.stack(out).to(x_t.dtype)

    # ---- internals --------------------------------------------------------------------------
    def _check_images(self, x: Tensor) -> None:
        expected = (3, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}")

    def _select(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The renders and colors a condition covers: U, B [N, P], norm2 [N, C'], colors [C', 3]."""
        shape, color, view = (int(v) for v in cond.tolist())
        shapes = slice(None) if shape < 0 else slice(shape, shape + 1)
        views = slice(None) if view < 0 else slice(view, view + 1)
        colors = slice(None) if color < 0 else slice(color, color + 1)
        u_sel = self.lib_u[views, shapes].reshape(-1, self.lib_u.shape[-1])
        b_sel = self.lib_b[views, shapes].reshape(-1, self.lib_b.shape[-1])
        norm2 = self.lib_norm2()[views, shapes][..., colors].reshape(u_sel.shape[0], -1)
        return u_sel, b_sel, norm2, self.colors[colors]

    def _selected_elevations(self, cond: Tensor) -> Tensor:
        """The elevations of the renders `_select(cond)` covers, in its order: [N] degrees."""
        shape, _, view = (int(v) for v in cond.tolist())
        elevations = self.render_elevations if view < 0 else self.render_elevations[view : view + 1]  # [V', K]
        shapes = len(SHAPES) if shape < 0 else 1
        return elevations[:, None, :].expand(-1, shapes, -1).reshape(-1)

    def _dots(self, x: Tensor, u_sel: Tensor, b_sel: Tensor, colors: Tensor) -> Tensor:
        """<x, A_k + B_k c> for every selected render k and color c [N, C'], with x [3, P]."""
        x_sum = x.sum(0)  # [P]
        dot_a = 2.0 * self.background * (x_sum @ u_sel.T) - x_sum.sum()  # [N]
        dot_b = x @ b_sel.T  # [3, N]
        return dot_a[:, None] + dot_b.T @ colors.T

    def _posterior(self, x: Tensor, t: int, cond: Tensor, elevation: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Posterior weights per render [N] and per channel for B [3, N], with the selection U, B [N, P]."""
        u_sel, b_sel, norm2, colors = self._select(cond)
        alpha_bar = float(self.alphas_cumprod[t])
        scale, var = alpha_bar**0.5, 1.0 - alpha_bar
        x = x.to(torch.float64).reshape(3, -1)  # [3, P]
        dist = (x**2).sum() - 2.0 * scale * self._dots(x, u_sel, b_sel, colors) + alpha_bar * norm2
        logits = -dist / (2.0 * var)  # [N, C']
        if elevation is not None and self.elevation_sigma > 0:
            logits = logits - ((self._selected_elevations(cond) - elevation) ** 2 / (2.0 * self.elevation_sigma**2))[:, None]
        w = torch.softmax(logits.flatten(), dim=0).view_as(dist)  # [N, C']
        weights_b = (w @ colors).T  # [3, N]: channel ch carries color_ch * B_k
        return w.sum(-1), weights_b, u_sel, b_sel

    # ---- evaluation helpers -----------------------------------------------------------------
    def classify(self, images: Tensor, view_words: list[str], noise_level: float = 0.2) -> list[str]:
        """The vocabulary prompt each clean image [B, H, W, 3] in [0, 1] most likely shows.

        Scores each prompt by the log-likelihood of the image under a Gaussian of std
        `noise_level` (in [-1, 1] units) around that prompt's library for the view word.
        """
        x = (2.0 * images.permute(0, 3, 1, 2) - 1.0).to(self.device)
        x = torch.nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        names = [(c, s) for s in SHAPES for c in COLORS]
        result = []
        for b, word in enumerate(view_words):  # of PRIOR_VIEW_WORDS
            v = PRIOR_VIEW_WORDS.index(word)
            scores = []
            for color, shape in names:
                cond = torch.tensor([SHAPES.index(shape), list(COLORS).index(color), v], device=self.device)
                u_sel, b_sel, norm2, colors = self._select(cond)
                xf = x[b].to(torch.float64).reshape(3, -1)
                dist = (xf**2).sum() - 2.0 * self._dots(xf, u_sel, b_sel, colors)[:, 0] + norm2[:, 0]
                scores.append(torch.logsumexp(-dist / (2.0 * noise_level**2), dim=0))
            best = int(torch.stack(scores).argmax())
            result.append(prompt_text(*names[best]))
        return result
