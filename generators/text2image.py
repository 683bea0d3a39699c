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

import copy
import hashlib
import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from synthgate.errors import ConfigError, InputError, MissingInputError, UsageError

from . import seeds
from .config import TrainConfig
from .model import DiffusionModel

FINETUNE = ("full", "lora")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# What a Stable Diffusion 1.x/2.x folder must hold (diffusers layout).
REQUIRED = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
            "tokenizer": "tokenizer/", "scheduler": "scheduler/scheduler_config.json"}
XL_REQUIRED = {"text_encoder_2": "text_encoder_2/config.json", "tokenizer_2": "tokenizer_2/"}


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


# ------------------------------------------------------------------ captions


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a caption template uses, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"--caption-template {template!r} is not a valid template ({exc})") from exc
    names: list[str] = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ConfigError(f"--caption-template {template!r}: {{{name}}} must be a plain column name "
                              "such as {label}")
        if name not in names:
            names.append(name)
    return tuple(names)


def check_template_columns(template: str, columns: Sequence[str], source) -> None:
    """Refuse a template naming a column the set's ``metadata.csv`` does not have."""
    available = ["label", *[c for c in columns if c not in ("path", "label")]]
    unknown = [f for f in template_fields(template) if f not in available]
    if unknown:
        raise InputError(f"--caption-template uses column {unknown[0]!r}, which metadata.csv does not have "
                         f"(columns: {', '.join(available)})", source)


def build_captions(template: str, records) -> list[str]:
    """One caption per image record: ``template`` filled with its label and ``metadata.csv`` values.

    Raises
    ------
    InputError
        An image lacks a value for a column the template uses.
    """
    names = template_fields(template)
    out = []
    for r in records:
        values = r.values()
        for name in names:
            if values.get(name) in (None, ""):
                raise InputError(f"image {r.key!r} has no value for column {name!r}, which the caption template "
                                 f"{template!r} uses")
        out.append(template.format(**{n: values[n] for n in names}))
    return out


class CaptionDropout:
    """Seeded Bernoulli draws: which captions of a batch are replaced by the empty prompt.

    Its generator state goes into checkpoints, so a resumed run drops the
    same captions as an uninterrupted one.
    """

    def __init__(self, rate: float, seed: int):
        self.rate, self.generator = rate, seeds.generator(seed)

    def draw(self, n: int):
        """A boolean mask of ``n`` entries, each ``True`` with probability ``rate``."""
        import torch

        return torch.rand(n, generator=self.generator) < self.rate

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------ base model


def check_base_model(path: str | Path) -> Path:
    """The base Stable Diffusion folder, checked for every part before any work (one-line errors)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError("base model folder does not exist (--base-model must be a local diffusers "
                                "Stable Diffusion folder)", path)
    unet_config = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").exists() else {}
    xl = is_xl(path)
    required = {**REQUIRED, **(XL_REQUIRED if xl else {})}
    missing = [f"{name} ({rel})" for name, rel in required.items() if not (path / rel).exists()]
    for tok in (("tokenizer", "tokenizer_2") if xl else ("tokenizer",)):
        folder = path / tok
        if folder.is_dir() and not ((folder / "tokenizer.json").exists() or
                                    ((folder / "vocab.json").exists() and (folder / "merges.txt").exists())):
            missing.append(f"tokenizer files ({tok}/vocab.json + merges.txt, or {tok}/tokenizer.json)")
    if missing:
        kind = "Stable Diffusion XL" if xl else "Stable Diffusion"
        raise InputError(f"is not a complete {kind} folder: missing {', '.join(missing)}", path)
    extra = unet_config.get("addition_embed_type")
    if unet_config.get("_class_name") not in (None, "UNet2DConditionModel") or extra not in (None, "text_time") \
            or (extra == "text_time") != xl:
        raise UsageError(f"unet/ is a {unet_config.get('_class_name')} with addition_embed_type {extra!r}; "
                         "supported are Stable Diffusion 1.x/2.x U-Nets (none) and SDXL base U-Nets ('text_time' "
                         "with text_encoder_2/)", path)
    return path


def is_xl(path: Path) -> bool:
    """Whether ``path`` looks like a Stable Diffusion XL folder (a second text encoder, size conditioning)."""
    unet = path / "unet" / "config.json"
    return (path / "text_encoder_2").exists() or (path / "tokenizer_2").exists() or \
        (unet.exists() and _read_json(unet).get("addition_embed_type") == "text_time")


def native_resolution(path: str | Path) -> int:
    """The image side the base pipeline was trained at (U-Net sample size x VAE downsampling)."""
    path = check_base_model(path)
    unet, vae = _read_json(path / "unet" / "config.json"), _read_json(path / "vae" / "config.json")
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def unet_config_digest(path: str | Path) -> str:
    """SHA-256 of the base U-Net's ``config.json`` (which architecture was fine-tuned)."""
    return hashlib.sha256((Path(path) / "unet" / "config.json").read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read ({exc})", path) from exc


def _load(cls, folder: Path, what: str):
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise InputError(f"cannot load the {what} ({' '.join(str(exc).split())[:200]})", folder) from exc


@dataclass
class PromptEncoder:
    """The frozen tokenizer(s) and CLIP text encoder(s) of a pipeline: prompts -> conditioning tensors.

    Stable Diffusion 1.x/2.x: the text encoder's last hidden states
    ``(N, tokens, dim)``.  SDXL: both encoders' penultimate hidden states
    side by side, plus one extra row carrying the second encoder's pooled
    projection and the six size/crop conditioning values (``resolution,
    resolution, 0, 0, resolution, resolution``: no crop), so that the
    conditioning still travels as one tensor per example through the
    trainer, opacus and the attacks; :func:`wrap_unet` unpacks it.
    """

    tokenizers: tuple
    encoders: tuple
    resolution: int = 0

    @property
    def pooled_dim(self) -> int | None:
        """SDXL: width of the pooled text embedding (``None`` for 1.x/2.x)."""
        return int(self.encoders[1].config.projection_dim) if len(self.encoders) == 2 else None

    def __call__(self, prompts: Sequence[str], batch_size: int = 32):
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                out.append(self._encode(list(prompts[start:start + batch_size])))
        return torch.cat(out)

    def _encode(self, prompts: list[str]):
        import torch

        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            if self.pooled_dim is None:
                return enc(ids)[0]
            o = enc(ids, output_hidden_states=True)
            hidden.append(o.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = o[0]  # the projection model's text_embeds (the last encoder)
        emb = torch.cat(hidden, -1)
        n, _, width = emb.shape
        if self.pooled_dim + 6 > width:
            raise InputError(f"the SDXL text embeddings ({width} wide) cannot carry the pooled embedding "
                             f"({self.pooled_dim}) and the size conditioning")
        row = torch.zeros(n, 1, width, dtype=emb.dtype, device=emb.device)
        row[:, 0, :self.pooled_dim] = pooled
        r = float(self.resolution)
        row[:, 0, self.pooled_dim:self.pooled_dim + 6] = torch.tensor([r, r, 0.0, 0.0, r, r], dtype=emb.dtype)
        return torch.cat([emb, row], 1)


def load_text_components(path: Path, device, resolution: int = 0) -> PromptEncoder:
    """The frozen tokenizer(s) and CLIP text encoder(s) of a pipeline folder (never downloaded)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on our stderr
    try:
        tokenizers = [_load(CLIPTokenizer, path / "tokenizer", "tokenizer")]
        encoders = [_load(CLIPTextModel, path / "text_encoder", "text encoder")]
        if (path / "text_encoder_2").exists():
            tokenizers.append(_load(CLIPTokenizer, path / "tokenizer_2", "second tokenizer"))
            encoders.append(_load(CLIPTextModelWithProjection, path / "text_encoder_2", "second text encoder"))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return PromptEncoder(tuple(tokenizers), tuple(e.to(device).eval().requires_grad_(False) for e in encoders),
                         resolution)


# ------------------------------------------------------------------ the denoiser


def wrap_unet(unet, uncond=None, pooled_dim: int | None = None):
    """``unet`` (a ``UNet2DConditionModel``) behind the ``(x_t, t, class_labels)`` call the trainer makes.

    ``class_labels`` carries text embeddings.  With ``guidance_scale != 1``
    (sampling) the conditional and unconditional predictions come from one
    doubled batch and are combined as in classifier-free guidance.
    """
    return _wrapper_class()(unet, uncond, pooled_dim)


_WRAPPER = None


def _wrapper_class():
    global _WRAPPER
    if _WRAPPER is None:
        import torch

        class TextConditionedUNet(torch.nn.Module):
            def __init__(self, unet, uncond=None, pooled_dim=None):
                super().__init__()
                self.unet = unet
                self.uncond = uncond
                self.pooled_dim = pooled_dim
                self.guidance_scale = 1.0

            @property
            def config(self):
                return self.unet.config

            @property
            def dtype(self):
                return self.unet.dtype

            def _unet(self, sample, timestep, emb):
                if self.pooled_dim is None:
                    return self.unet(sample, timestep, encoder_hidden_states=emb)
                p, extra = self.pooled_dim, emb[:, -1]  # SDXL: unpack PromptEncoder's extra row
                return self.unet(sample, timestep, encoder_hidden_states=emb[:, :-1],
                                 added_cond_kwargs={"text_embeds": extra[:, :p], "time_ids": extra[:, p:p + 6]})

            def forward(self, sample, timestep, class_labels=None):
                g = self.guidance_scale
                if g == 1.0 or self.training:
                    return self._unet(sample, timestep, class_labels)
                n = sample.shape[0]
                t = torch.as_tensor(timestep, device=sample.device)
                t = torch.cat([t, t]) if t.ndim else t
                emb = torch.cat([self.uncond.to(class_labels.dtype).expand(n, -1, -1), class_labels])
                out = self._unet(torch.cat([sample, sample]), t, emb).sample
                uncond, cond = out.chunk(2)
                return SimpleNamespace(sample=uncond + g * (cond - uncond))

        _WRAPPER = TextConditionedUNet
    return _WRAPPER


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


# ------------------------------------------------------------------ training


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

    from .data import open_training_set
    from .run import TrainingRun, model_space, refuse_existing
    from .train import Trainer

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
    unet = _load(UNet2DConditionModel, base / "unet", "U-Net")
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
    from .export import save_model

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

    from .run import model_info

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


# ------------------------------------------------------------------ loading and sampling


@dataclass
class TextDiffusionModel(DiffusionModel):
    """A fine-tuned text-to-image model: :class:`DiffusionModel` whose conditions are caption embeddings.

    ``unet`` is the wrapped U-Net (:func:`wrap_unet`), so ``predict_eps``
    and :func:`generators.sample.denoise` work unchanged; ``guidance_scale``
    (:meth:`set_guidance`) applies to sampling only.
    """

    prompts: Any = None  # PromptEncoder
    _embeddings: dict = field(default_factory=dict, repr=False)

    is_text = True

    @property
    def conditioning(self) -> dict:
        return self.info["conditioning"]

    @property
    def labels(self) -> list[str] | None:
        labels = self.conditioning.get("labels")
        return list(labels) if labels else None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = int(self.info["vae"]["latent_size"])
        return int(self.unet.config.in_channels), size, size

    def set_guidance(self, scale: float) -> float:
        """Classifier-free guidance scale for sampling (1: the conditional prediction alone)."""
        if not scale >= 0:
            raise UsageError(f"--guidance-scale {scale} must be >= 0")
        self.unet.guidance_scale = float(scale)
        return float(scale)

    def caption(self, label: str | None) -> str:
        """The training caption of ``label`` (the empty prompt when the model has none for it).

        A template that uses columns besides ``label`` has no caption per
        label: attacks then query the unconditional prediction.
        """
        by_label = self.conditioning.get("caption_by_label")
        if not by_label:
            fields = template_fields(self.conditioning["template"])
            return self.conditioning["template"] if not fields else ""
        if label is None:
            return ""
        if str(label) not in by_label:
            raise InputError(f"label {label!r} is not one the model knows ({', '.join(by_label)})", self.path)
        return by_label[str(label)]

    def embed(self, prompts: Sequence[str]):
        """Text embeddings of ``prompts`` on the model's device (cached per prompt)."""
        import torch

        todo = sorted({p for p in prompts if p not in self._embeddings})
        if todo:
            for p, e in zip(todo, self.prompts(todo)):
                self._embeddings[p] = e
        return torch.stack([self._embeddings[p] for p in prompts]).to(self.device)

    def class_labels(self, labels):
        """Label strings -> the embeddings of their training captions (what the attacks condition on)."""
        return self.embed([self.caption(v) for v in labels])

    def condition_records(self, records):
        """Real images -> the embeddings of the captions they were (or would have been) trained with.

        The template is filled from each image's own ``metadata.csv`` values;
        when the set lacks a column the template uses, each image gets its
        label's caption (the unconditional prediction if there is none).
        """
        template = self.conditioning["template"]
        fields = template_fields(template)
        if all(r.values().get(f) not in (None, "") for r in records for f in fields):
            return self.embed(build_captions(template, records))
        return self.class_labels([r.label for r in records])

    def condition(self, items):
        """Embeddings of each sample item's prompt (its label's caption unless it carries its own)."""
        return self.embed([it.prompt if it.prompt is not None else self.caption(it.label)
                           for it in items])


def load_text_model(path: Path, info: dict, device) -> TextDiffusionModel:
    """Load a text-to-image model directory (``conditioning.type == "text"``) onto ``device``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    device = torch.device(device)
    unet = _load(UNet2DConditionModel, path / "unet", "U-Net").to(device).eval().requires_grad_(False)
    scheduler = _load(DDPMScheduler, path / "scheduler", "scheduler")
    vae = _load(AutoencoderKL, path / "vae", "VAE").to(device).eval().requires_grad_(False)
    prompts = load_text_components(path, device, int(info["resolution"]))
    model = TextDiffusionModel(path, wrap_unet(unet, pooled_dim=prompts.pooled_dim).eval(), scheduler, vae, info,
                               device, prompts)
    model.unet.uncond = model.embed([""])[0:1]
    return model


def prompt_items(model: TextDiffusionModel, items, prompt: str | None, label_given: bool) -> list:
    """Attach each planned image's prompt: ``--prompt``, else its label's caption, else a training caption."""
    if prompt is not None:
        return [replace(it, label=it.label if label_given else None, prompt=prompt) for it in items]
    if model.labels is not None:
        return [replace(it, prompt=model.caption(it.label)) for it in items]
    captions = model.conditioning["captions"]
    return [replace(it, prompt=captions[it.index % len(captions)]) for it in items]


__all__ = ["TextConfig", "template_fields", "build_captions", "CaptionDropout", "check_base_model", "train",
           "TextDiffusionModel", "load_text_model", "prompt_items", "wrap_unet"]
