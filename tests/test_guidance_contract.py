"""The contract every registered guidance model keeps (`guidance.registry.Guidance`), checked on each:
its attributes, prompt encoding (deterministic, cached where the model caches), noise prediction
(shape, dtype, finite) and one SDS step whose gradient is finite and reaches the image.

The hub models run as the tiny random pipelines of tests/tiny_pipelines.py; the primitives prior as
the session's tiny prior (conftest.py). A newly registered model fails here until it has a tiny build.
"""
import pytest
import torch

from guidance import load, registry
from guidance.registry import Guidance
from guidance.sds import SDSConfig, SDSLoss

PROMPT = "a red cube"  # in the primitives prior's vocabulary and in the tiny tokenizers' words


@pytest.fixture(scope="module")
def models(request):
    """name -> a function building that model small, on the CPU (each built once, on first use)."""
    built = {}

    def build(name):
        if name not in built:
            if name == "primitives":
                built[name] = request.getfixturevalue("tiny_prior")
            elif name == "stable-diffusion":
                built[name] = load(name, device="cpu", model_id=str(request.getfixturevalue("sd_folder")))
            elif name == "deepfloyd-if":
                built[name] = load(name, device="cpu", model_id=str(request.getfixturevalue("if_folder")))
            else:
                pytest.fail(f"guidance model {name!r} has no tiny build in tests/test_guidance_contract.py: add one")
        return built[name]

    return build


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tiny folders only: no hub look-up


def _model_input(model, batch: int, generator: torch.Generator) -> torch.Tensor:  # [B, C, h, w]
    images = torch.rand(batch, 3, model.resolution, model.resolution, generator=generator)
    if model.space == "latent":
        with torch.no_grad():
            return model.encode_images(images).float()
    return images * 2.0 - 1.0


@pytest.mark.parametrize("name", registry.names())
def test_the_model_has_the_contracts_attributes(name, models):
    model = models(name)
    assert isinstance(model, Guidance)
    assert model.space in ("pixel", "latent") and (model.space == "pixel" or hasattr(model, "encode_images"))
    assert isinstance(model.resolution, int) and model.resolution >= 8
    a = model.alphas_cumprod
    assert a.dim() == 1 and a.shape[0] >= 2 and bool(((a > 0) & (a < 1)).all()) and bool((a[1:] < a[:-1]).all())
    assert model.default_guidance_scale > 0 and isinstance(model.view_dependent_uncond, bool)


@pytest.mark.parametrize("name", registry.names())
def test_prompt_encoding_is_deterministic_tells_texts_apart_and_is_cached(name, models):
    model = models(name)
    texts = [f"{PROMPT}, front view", f"{PROMPT}, back view", ""]
    first = model.encode_prompt(texts)
    assert first.shape[0] == len(texts)
    assert not first.is_floating_point() or bool(torch.isfinite(first).all())
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    cache = getattr(model, "embeddings", None)  # the hub models' EmbeddingCache
    encoded = cache.encoded_texts if cache is not None else None
    again = model.encode_prompt([texts[1], texts[0]])
    torch.testing.assert_close(again, first[[1, 0]], rtol=0, atol=0)
    if cache is not None:
        assert cache.encoded_texts == encoded  # both were served from the cache


@pytest.mark.parametrize("name", registry.names())
def test_noise_prediction_has_the_inputs_shape_and_dtype_and_is_finite(name, models):
    model = models(name)
    generator = torch.Generator().manual_seed(0)
    x0 = _model_input(model, 2, generator)
    t = torch.tensor([50, 800])
    a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        eps = model.predict_noise(x_t, t, model.encode_prompt([PROMPT, PROMPT]))
    assert eps.shape == x_t.shape and eps.dtype == x_t.dtype
    assert bool(torch.isfinite(eps).all()) and float(eps.abs().max()) > 0


@pytest.mark.parametrize("name", registry.names())
def test_one_sds_step_gives_a_finite_gradient_on_the_image(name, models):
    model = models(name)
    loss_fn = SDSLoss(model, PROMPT, SDSConfig(guidance_scale=7.5))
    images = torch.rand(2, model.resolution, model.resolution, 3, generator=torch.Generator().manual_seed(1))
    images.requires_grad_(True)
    loss, info = loss_fn(images, ["front", "side"], progress=0.3, generator=torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.isfinite(loss) and info["grad_norm"] > 0
    assert bool(torch.isfinite(images.grad).all()) and float(images.grad.abs().sum()) > 0
