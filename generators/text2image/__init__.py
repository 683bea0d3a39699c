"""Text-guided latent diffusion fine-tuned from a local Stable Diffusion folder (the MediSyn recipe).

``synthgate train REAL --out MODEL --base-model SD_DIR`` fine-tunes the U-Net
of a Stable Diffusion 1.x/2.x or SDXL pipeline on image-caption pairs, the captions
built from a template over ``metadata.csv`` columns (``"Chest X-ray showing
{label}"``).  The VAE and the CLIP text encoder stay frozen; the caption of
each image is encoded once up front, and during training it is replaced by
the empty prompt with probability ``caption_dropout`` so that one network
learns both the conditional and the unconditional noise prediction
(classifier-free guidance).  The U-Net is trained in full or through LoRA
adapters (peft), reusing :class:`generators.train.Trainer` unchanged: the
text embeddings travel in its ``labels`` slot and :func:`wrap_unet` hands them
to the U-Net as ``encoder_hidden_states``.

The model directory is a diffusers ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline`` (LoRA merged
into the weights; the adapter alone in ``lora/``) plus ``synthgate.json``
(``conditioning.type == "text"``); :func:`load_text_model` reads it back for
``synthgate sample`` (guidance scale, per-image prompts) and for the
membership-inference attacks, whose ``class_labels(labels)`` become the
caption embeddings of those labels.

Modules, one idea each:

- :mod:`~generators.text2image.captions`: caption templates and caption dropout;
- :mod:`~generators.text2image.base`: the base folder (checking and loading a
  1.x/2.x or SDXL pipeline) and the prompt encoder;
- :mod:`~generators.text2image.train`: the settings (:class:`TextConfig`),
  fine-tuning (full or LoRA) and saving the pipeline;
- :mod:`~generators.text2image.model`: the guided U-Net wrapper, loading a
  fine-tuned model and preparing prompts for sampling.

Their public names are importable from here as well.

Notes
-----
Cui et al. 2024/25 (MediSyn): SDXL U-Net fine-tuned on captions built from
labels, captions dropped 10% of the time.  Ho & Salimans 2022 (classifier-free
guidance): ``eps = eps_uncond + w (eps_cond - eps_uncond)``.  Hu et al. 2022
(LoRA); the adapter placement (attention ``to_q/to_k/to_v/to_out.0``) follows
diffusers' ``train_text_to_image_lora.py``; SDXL's conditioning (penultimate
hidden states of both encoders, pooled embedding, size/crop ids) follows
``train_text_to_image_sdxl.py``.
"""
from __future__ import annotations

from .base import (REQUIRED, XL_REQUIRED, PromptEncoder, check_base_model, is_xl, load_part, load_text_components,
                   native_resolution, unet_config_digest)
from .captions import CaptionDropout, build_captions, check_template_columns, template_fields
from .model import TextDiffusionModel, load_text_model, prompt_items, wrap_unet
from .train import FINETUNE, LORA_TARGETS, TextConfig, add_lora, merged_unet, train

__all__ = ["TextConfig", "template_fields", "check_template_columns", "build_captions", "CaptionDropout",
           "check_base_model", "is_xl", "native_resolution", "unet_config_digest", "load_part", "PromptEncoder",
           "load_text_components", "REQUIRED", "XL_REQUIRED", "FINETUNE", "LORA_TARGETS", "wrap_unet", "add_lora",
           "merged_unet", "train", "TextDiffusionModel", "load_text_model", "prompt_items"]
