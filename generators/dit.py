"""diffusers' DiT as a synthgate denoiser (the UNet's calling protocol).

:class:`DiTDenoiser` is ``DiTTransformer2DModel`` with three differences, all
at the call boundary: a scalar timestep is broadcast to the batch (the
sampler passes one), an unconditional model is a one-class DiT called with
class 0 (DiT's adaLN-Zero always embeds a label), and the label dropout DiT
uses for classifier-free guidance is off -- it draws from torch's global
random state, which would make training irreproducible from the seed, and
the sampler does not use guidance.  The weights and config are DiT's own:
the folder also loads with ``DiTTransformer2DModel.from_pretrained``.

Notes
-----
Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT,
adaLN-Zero blocks).  ``out_channels`` equals ``in_channels``: the learned
variance of the paper (twice the channels) is not trained here, as the
trainer's loss is the simple DDPM loss.
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding


class DiTDenoiser(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` called as ``net(x_t, t, class_labels=None).sample``.

    Build it with :func:`build_dit` (label dropout off); ``from_pretrained``
    gives the same network for sampling (the dropout acts in training only).
    """

    def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.expand(batch)
        if class_labels is None:
            class_labels = torch.zeros(batch, dtype=torch.long, device=hidden_states.device)
        return super().forward(hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)


def build_dit(**kwargs) -> DiTDenoiser:
    """A :class:`DiTDenoiser` from DiT's own settings, with the label dropout off (see the module docstring)."""
    net = DiTDenoiser(**kwargs)
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return net


__all__ = ["DiTDenoiser", "build_dit"]
