"""Turn a UNet's output into the noise prediction epsilon, whatever its prediction type.

SD 1.x and SDXL UNets predict the noise (``epsilon``); SD 2.x 768-v models
predict the velocity ``v = alpha_t * eps - sigma_t * x0`` (``v_prediction``);
a few predict the clean sample (``sample``). NeMo's score is defined on the
noise prediction, so it is converted here with the scheduler's
``alphas_cumprod`` (alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2).
Pure tensor computation; the prediction type comes from the pipeline's
scheduler configuration (see :attr:`LoadedModel.prediction_type`).
"""

from __future__ import annotations

import torch

#: Prediction types diffusers' schedulers know.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_epsilon(
    output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor | int, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Return epsilon for a UNet ``output`` at ``timestep`` given the noisy ``sample`` it saw.

    ``timestep`` is one training timestep for the whole batch (as NeMo scores one step).
    Computed in float32 and returned in ``output``'s dtype.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    t = int(timestep)
    acp = alphas_cumprod.to(torch.float64)[t]
    alpha, sigma = float(acp.sqrt()), float((1 - acp).sqrt())
    out, x = output.float(), sample.float()
    if prediction_type == "v_prediction":
        eps = alpha * out + sigma * x
    else:  # "sample": output is x0
        eps = (x - alpha * out) / sigma
    return eps.to(output.dtype)
