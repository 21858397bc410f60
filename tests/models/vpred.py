"""A tiny SD 2.x-style v-prediction pipeline (the tiny SD pipeline with a v_prediction scheduler)."""

from __future__ import annotations

from tests.models.tiny import TinySpec, build_pipeline


def build_vpred_pipeline(spec: TinySpec = TinySpec()):
    """Build the tiny StableDiffusionPipeline whose scheduler says the UNet predicts v (as SD 2.x 768-v)."""
    from diffusers import DDIMScheduler

    pipe = build_pipeline(spec)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe
