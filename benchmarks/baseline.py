"""The reference both benchmarks compare against: diffusers' own pipeline, run the way its documentation runs it."""
from __future__ import annotations

import copy

from diffusers import DiffusionPipeline


def documented_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """``pipe`` with every component in one dtype, as diffusers documents ``from_pretrained(torch_dtype=...)``.

    The engine keeps its VAE in fp32 beside a half-precision DiT. diffusers' pipelines hand the VAE latents in the
    DiT's dtype, so they cannot decode with it (on a GPU: "Input type (c10::Half) and bias type (float) should be the
    same"); the pipeline then gets a copy of the VAE in the DiT's dtype, and shares the rest."""
    if pipe.vae.dtype == pipe.transformer.dtype:
        return pipe
    for module in pipe.vae.modules():  # torch's (old) weight norm keeps the weight it last computed, a tensor with
        if hasattr(module, "weight_g"):  # a graph that deepcopy refuses; the next forward computes it again anyway
            module.weight = module.weight.detach()
    pipeline = type(pipe)(**{**pipe.components, "vae": copy.deepcopy(pipe.vae).to(pipe.transformer.dtype)})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
