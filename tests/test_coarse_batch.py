"""The coarse stage's SDS loss is per image, as the refine stage's: a bigger batch averages the
images' gradients instead of adding them up."""
import torch

from geometry.nerf import FieldConfig
from renderers.cameras import CameraConfig
from renderers.volume import VolumeConfig
from stages import coarse, loop
from stages.coarse import CoarseConfig


class UnitSDS:
    """Stands in for SDSLoss: every pixel of every image gets gradient 1 (d loss / d x = 1)."""

    def __init__(self, guidance, prompt, config):
        pass

    def __call__(self, images, view_words, progress=0.0, generator=None, elevations=None, texture_images=None):
        batch = images.shape[0]
        return images.sum(), {"t": torch.full((batch,), 500), "texture_loss": None}


def _first_step_gradient_norm(batch_size: int, monkeypatch) -> float:
    norms = []
    original = loop.backward_finite

    def recording(loss, optimizer):
        original(loss, optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))

    monkeypatch.setattr(coarse, "SDSLoss", UnitSDS)
    monkeypatch.setattr(loop, "backward_finite", recording)
    config = CoarseConfig(
        iters=1, batch_size=batch_size, resolution=16, preview_every=0, preview_views=1, preview_resolution=8,
        albedo_warmup=0, prob_albedo=1.0, prob_lambertian=0.0, prob_textureless=0.0, lambda_orientation=0.0, lambda_sparsity=0.0, lambda_entropy=0.0, background="white",
        field=FieldConfig(num_levels=4, log2_table_size=12, base_resolution=8, max_resolution=32, hidden_dim=16, num_layers=1),
        volume=VolumeConfig(num_samples=16, use_occupancy=False),
    )
    # One camera, no jitter: the batch's images are one image (up to the ray samples' jitter) four times.
    camera = CameraConfig(elevation_range=(15.0, 15.0), azimuth_range=(30.0, 30.0), distance_range=(2.0, 2.0),
                          fovy_range=(45.0, 45.0), position_jitter=0.0, target_jitter=0.0, up_jitter=0.0)
    coarse.run(object(), "a red cube", config, camera, "cpu")
    return norms[0]


def test_the_sds_gradient_per_image_does_not_grow_with_the_batch(monkeypatch):
    one = _first_step_gradient_norm(1, monkeypatch)
    four = _first_step_gradient_norm(4, monkeypatch)
    assert one > 0
    # Summed over the batch, four copies of one image gave 4x its gradient; a mean gives 1x.
    assert 0.8 < four / one < 1.25, (one, four)


def test_repeated_non_finite_steps_name_the_precision_setting():
    import pytest

    from guidance.sds import NonFiniteError
    from stages.common import StageError
    from stages.loop import NonFiniteSteps

    steps = NonFiniteSteps("coarse", limit=2)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    steps.skip(1, 5, NonFiniteError("the SDS gradient is not finite"), optimizer, None)
    with pytest.raises(StageError, match=r"2 steps in a row were not finite .*or set model_dtype=bf16/fp32\)"):
        steps.skip(2, 5, NonFiniteError("the SDS gradient is not finite"), optimizer, None)
