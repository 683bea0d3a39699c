"""Fine-tuning a Stable Diffusion U-Net on captioned images (in full or through LoRA), and saving the pipeline.

:func:`train` is the counterpart of :func:`generators.run.train` for
``--base-model``: the same :class:`~generators.run.TrainingRun` (accelerator,
checkpoints, resume, step loop) and :class:`~generators.train.Trainer`, with
the text embeddings travelling in the trainer's ``labels`` slot.  The VAE
and the text encoder(s) stay frozen; each distinct caption is encoded once
up front.

Notes
-----
Hu et al. 2022 (LoRA); the adapter placement (attention
``to_q/to_k/to_v/to_out.0``) follows diffusers'
``train_text_to_image_lora.py``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from synthgate.errors import ConfigError, InputError, UsageError

from .. import seeds
from ..config import TrainConfig
from .base import PromptEncoder, check_base_model, is_xl, load_part, load_text_components, unet_config_digest
from .captions import CaptionDropout, build_captions, check_template_columns, template_fields
from .model import wrap_unet

FINETUNE = ("full", "lora")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TextConfig:
    """The text-conditioning settings of a run (they join :class:`TrainConfig` in checkpoints).

    Attributes
    ----------
    base_model
        Local diffusers Stable Diffusion folder whose U-Net is fine-tuned.
    caption_template
        ``str.format`` template over ``metadata.csv`` columns (``{label}`` and
        any other column of the set).
    caption_dropout
        Probability that an image's caption is replaced by the empty prompt
        at a step (classifier-free guidance training).
    finetune, lora_rank
        ``full`` U-Net fine-tuning, or LoRA adapters of this rank.
    """

    base_model: str
    caption_template: str = "{label}"
    caption_dropout: float = 0.1
    finetune: str = "full"
    lora_rank: int = 4

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption dropout {self.caption_dropout} must be in [0, 1)")
        if self.finetune not in FINETUNE:
            raise ConfigError(f"--finetune {self.finetune!r} must be `full` or `lora`")
        if self.lora_rank < 1:
            raise ConfigError(f"--lora-rank {self.lora_rank} must be at least 1")
        template_fields(self.caption_template)

    def to_dict(self) -> dict:
        return {"base_model": str(self.base_model), "caption_template": self.caption_template,
                "caption_dropout": self.caption_dropout, "finetune": self.finetune, "lora_rank": self.lora_rank}


def add_lora(unet, rank: int) -> None:
    """Freeze ``unet`` and add rank-``rank`` LoRA adapters to its attention projections (peft)."""
    from synthgate.errors import require

    peft = require("peft", purpose="LoRA fine-tuning (--finetune lora)")
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGETS)))


def merged_unet(unet, lora: bool):
    """A plain ``UNet2DConditionModel`` carrying ``unet``'s weights (LoRA adapters merged in)."""
    plain = copy.deepcopy(unet)
    if lora:
        plain.fuse_lora()
        plain.unload_lora()
    return plain.eval()


def train(real: str | Path, out: str | Path, config: TrainConfig, text: TextConfig, *, device: str = "auto",
          checkpoint_dir: str | Path | None = None, resume: bool = False, keep_checkpoints: bool = False,
          overwrite: bool = False, progress: bool | None = None, log=None, log_every: int | None = None,
          skip_unreadable: bool = False):
    """Fine-tune ``text.base_model``'s U-Net on ``real`` with captions; save a pipeline to ``out``.

    The counterpart of :func:`generators.run.train` for ``--base-model``;
    returns a :class:`generators.run.TrainResult`.
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from synthgate.imageset import metadata_columns

    from ..data import open_training_set
    from ..run import TrainingRun, model_space, refuse_existing
    from ..train import Trainer

    refuse_existing(out, overwrite)
    base = check_base_model(text.base_model)
    columns = metadata_columns(real)
    check_template_columns(text.caption_template, columns, Path(real) / "metadata.csv")
    if config.dp is not None and text.finetune != "lora":
        raise UsageError("differentially private fine-tuning of a base model trains LoRA adapters only "
                         "(DP-LoRA); add --finetune lora")
    # the base pipeline's noise schedule is the one it was trained with: it replaces the config's
    base_sched = DDPMScheduler.from_pretrained(base / "scheduler", local_files_only=True)
    config = config.replace(num_train_timesteps=int(base_sched.config.num_train_timesteps),
                            beta_schedule=str(base_sched.config.beta_schedule),
                            prediction_type=str(base_sched.config.prediction_type))
    run = TrainingRun.start(out, config, device=device, checkpoint_dir=checkpoint_dir,
                            settings={**config.to_dict(), "text": text.to_dict()})
    on = run.accelerator.device
    # Every extra column is an attribute already; declaring the template's own columns lets one that
    # resembles a known name (e.g. {labels}) fill it, while other look-alikes are still refused.
    training = open_training_set(real, config.resolution, "none", skip_unreadable=skip_unreadable,
                                 progress=progress if run.main else False,
                                 extra_columns=template_fields(text.caption_template))
    digest = training.images.digest
    captions = build_captions(text.caption_template, training.images.records)
    distinct = sorted(set(captions))
    caption_ids = torch.as_tensor([distinct.index(c) for c in captions])

    vae, space, fetch = model_space(training, config.replace(vae=str(base)), on)
    prompts = load_text_components(base, on, config.resolution)
    table = prompts(["", *distinct])  # row 0: the empty prompt (dropout)
    unet = load_part(UNet2DConditionModel, base / "unet", "U-Net")
    _check_geometry(unet, space, base)
    noise_scheduler = DDPMScheduler.from_config(base_sched.config, clip_sample=False)  # latents are unbounded
    state, resumed_from = run.resume_state(digest, resume, log)
    with torch.random.fork_rng(devices=[]):  # LoRA's initial weights follow from the seed
        torch.manual_seed(seeds.derive_seed(config.seed, "init"))
        if text.finetune == "lora":
            add_lora(unet, text.lora_rank)
    model = wrap_unet(unet, pooled_dim=prompts.pooled_dim)
    trainer = Trainer(config, model, noise_scheduler, len(training), accelerator=run.accelerator, state=state)
    rank = run.accelerator.process_index
    dropout = CaptionDropout(text.caption_dropout, seeds.derive_seed(config.seed, f"caption-dropout:{rank}"))
    if state is not None:  # one generator state per process, as the trainer keeps its own
        dropout.load_state_dict(state["caption_dropout"][rank])

    def next_batch():
        idx = torch.as_tensor(trainer.next_indices(), dtype=torch.long)
        rows = torch.where(dropout.draw(len(idx)), 0, caption_ids[idx] + 1)
        x0 = torch.as_tensor(fetch(idx.numpy()), device=on)
        return x0, table[rows.to(table.device)]

    def save_checkpoint(done: int) -> None:  # gathered on every process, written by the main one
        run.save_checkpoint(done, digest, {**trainer.state_dict(),
                                           "caption_dropout": _gathered(dropout.state_dict(), run.accelerator)})

    start = trainer.step_count
    seconds = run.loop(trainer, config, next_batch, save_checkpoint, progress=progress, log=log, log_every=log_every)

    info = _info(config, text, training, space, trainer, run, resumed_from, seconds, distinct, base)
    if run.main:
        _save(run.out, trainer, text, noise_scheduler, vae, prompts, space, info, overwrite)
    return run.finish(trainer, config, keep_checkpoints=keep_checkpoints, start=start, resumed_from=resumed_from,
                      seconds=seconds, info=info)


def _gathered(value, accelerator) -> list:
    """``value`` of every process, in process order (a one-item list in one process)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _check_geometry(unet, space, base: Path) -> None:
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if space.size % factor:
        raise UsageError(f"the latent side {space.size} (resolution / VAE factor) must be divisible by the base "
                         f"U-Net's downsampling factor {factor}; choose another --resolution", base)
    if unet.config.in_channels != space.channels:
        raise InputError(f"the U-Net takes {unet.config.in_channels} channels but the VAE makes {space.channels}",
                         base)


def _save(out: Path, trainer, text: TextConfig, noise_scheduler, vae, prompts: PromptEncoder, space, info,
          overwrite):
    from ..export import save_model

    tuned = trainer.final_unet().unet
    unet = merged_unet(tuned, text.finetune == "lora")
    unet.register_to_config(sample_size=space.size)  # diffusers' default size is then the trained one
    parts = dict(vae=vae, unet=unet, scheduler=noise_scheduler, text_encoder=prompts.encoders[0],
                 tokenizer=prompts.tokenizers[0])
    if prompts.pooled_dim is None:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        from diffusers import StableDiffusionXLPipeline

        # the empty prompt's embeddings, not zeros, for the unconditional branch: what training dropped to
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=prompts.encoders[1], tokenizer_2=prompts.tokenizers[1],
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)

    def extra(tmp: Path) -> None:
        if text.finetune == "lora":
            tuned.save_lora_adapter(tmp / "lora", safe_serialization=True)

    save_model(out, unet, noise_scheduler, None, info, overwrite=overwrite, pipeline=pipe, extra=extra)


def _info(config: TrainConfig, text: TextConfig, training, space, trainer, run, resumed_from, seconds,
          captions: list[str], base: Path) -> dict:
    """``synthgate.json`` for a text-conditioned model (DESIGN.md's contract, conditioning ``text``)."""
    from synthgate.provenance import versions

    from ..run import model_info

    info = model_info(config, training, space, trainer, run, resumed_from, seconds, None)
    label_only = set(template_fields(text.caption_template)) <= {"label"}
    labels = sorted({r.label for r in training.images.records}) if label_only and "label" in \
        template_fields(text.caption_template) else None
    info.update({
        "kind": "text2image",
        "conditioning": {
            "type": "text", "template": text.caption_template, "captions": captions, "dropout": text.caption_dropout,
            "labels": labels,
            "caption_by_label": None if labels is None else {lab: text.caption_template.format(label=lab)
                                                             for lab in labels},
        },
        "vae": {"scaling_factor": space.scaling_factor, "source": str(base.resolve() / "vae"),
                "latent_channels": space.channels, "latent_size": space.size, "in_channels": space.vae_in_channels},
        "base_model": {"path": str(base.resolve()), "unet_config_sha256": unet_config_digest(base),
                       "family": "sdxl" if is_xl(base) else "sd",
                       "finetune": text.finetune, "lora_rank": text.lora_rank if text.finetune == "lora" else None,
                       "lora_targets": list(LORA_TARGETS) if text.finetune == "lora" else None},
        "text": text.to_dict(),
        "versions": versions("transformers", *(("peft",) if text.finetune == "lora" else ()),
                             *(("opacus",) if info["dp"] else ())),
    })
    return info


__all__ = ["FINETUNE", "LORA_TARGETS", "TextConfig", "add_lora", "merged_unet", "train"]
