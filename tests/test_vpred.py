"""SD 2.x v-prediction: the score uses the noise prediction, sampling follows the scheduler's prediction type."""

from __future__ import annotations

import pytest
import torch

from nemo_surgery.engine.prediction import to_epsilon


def _schedule():
    from tests.models.tiny import build_scheduler

    return build_scheduler().alphas_cumprod


@pytest.mark.parametrize("t", [1, 500, 981])
def test_to_epsilon_recovers_the_noise(t):
    gen = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    acp = _schedule()
    a, s = acp[t].sqrt(), (1 - acp[t]).sqrt()
    xt = a * x0 + s * eps
    torch.testing.assert_close(to_epsilon(a * eps - s * x0, xt, t, acp, "v_prediction"), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(to_epsilon(x0, xt, torch.tensor(t), acp, "sample"), eps, atol=1e-3, rtol=1e-3)
    assert to_epsilon(eps, xt, t, acp, "epsilon") is eps
    with pytest.raises(ValueError, match="unknown prediction type"):
        to_epsilon(eps, xt, t, acp, "flow")


@pytest.fixture(scope="module")
def vpred_model(tmp_path_factory):
    from nemo_surgery.engine.model import load_model
    from tests.models.tiny import save_pipeline
    from tests.models.vpred import build_vpred_pipeline

    folder = save_pipeline(build_vpred_pipeline(), tmp_path_factory.mktemp("vpred") / "pipe")
    return load_model(folder, device="cpu", dtype="fp32", with_vae=True)


def test_score_uses_epsilon_of_a_v_prediction_model(vpred_model):
    """The noise differences are eps - x_t with eps as diffusers' own DDIM step implies it, not v - x_t."""
    from diffusers import DDIMScheduler

    from nemo_surgery.engine.score import Scorer, ScoreSettings, min_max_scale

    assert vpred_model.prediction_type == "v_prediction"
    scorer = Scorer(vpred_model, vpred_model.layers, ScoreSettings(seeds=3), batch_size=8)
    cond = vpred_model.encode(["a photo of a dog"])
    deltas = scorer.noise_differences(cond)[0]

    x, t = scorer.latents, scorer.timestep
    with torch.no_grad():
        v = vpred_model.unet(x, t, **cond.repeat(3).unet_kwargs()).sample
    ddim = DDIMScheduler.from_config(vpred_model.pipe.scheduler.config)
    ddim.set_timesteps(50)
    x0 = ddim.step(v, t, x, eta=0.0).pred_original_sample  # diffusers' own reading of v
    acp = ddim.alphas_cumprod[int(t)]
    eps = (x - acp.sqrt() * x0) / (1 - acp).sqrt()
    torch.testing.assert_close(deltas, min_max_scale(eps - x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(deltas, min_max_scale(v - x), atol=1e-2)


def test_sampling_matches_the_diffusers_pipeline_for_v_prediction(vpred_model):
    """verify's sampler draws what StableDiffusionPipeline draws with the same latents and DDIM schedule."""
    from diffusers import DDIMScheduler

    from nemo_surgery.engine.score import draw_latents
    from nemo_surgery.verify.sampling import SampleSettings, sample_images

    settings = SampleSettings(seeds=2, seed=3, steps=3, guidance=4.0, batch_size=4)
    prompt = "a red circle on a blue background"
    ours = sample_images(vpred_model, vpred_model.encode([prompt]), settings)[0]

    pipe = vpred_model.pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = draw_latents(vpred_model.latent_shape, 2, 3)
    theirs = pipe([prompt] * 2, num_inference_steps=3, guidance_scale=4.0, latents=latents, eta=0.0,
                  output_type="pt", height=8, width=8).images
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1).float(), atol=2e-4, rtol=1e-3)
