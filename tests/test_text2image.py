"""generators.text2image: caption templates, caption dropout, full and LoRA fine-tuning of a Stable
Diffusion folder, resume, the saved pipeline, guided sampling with prompts, DP-LoRA gradients, attacks.

The base model is a tiny randomly initialised Stable Diffusion pipeline built here and saved to a temp
dir (tiny UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer over a byte vocabulary
written to disk): nothing is downloaded.  Images are 16 x 16 phantoms, a few steps per run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from synthgate import cli
from synthgate.phantoms import write_phantoms
from conftest import assert_golden, one_line_error
from generators.text2image.tiny import bytes_to_unicode, tiny_stable_diffusion, tiny_stable_diffusion_xl  # noqa: F401

TEMPLATE = "Phantom showing {label}"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: 1 thread is ~10x faster here
FAST = ["--resolution", "16", "--batch-size", "4", "--quiet"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sd(tmp_path_factory, one_torch_thread) -> Path:
    return tiny_stable_diffusion(tmp_path_factory.mktemp("t2i"))


@pytest.fixture(scope="module")
def ph(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "ph"
    write_phantoms(out, patients=10, images_per_patient=2, size=16, seed=3, holdout_fraction=0.5)
    return out / "train"


@pytest.fixture(scope="module")
def full(sd, ph, tmp_path_factory) -> Path:
    """Full U-Net fine-tuning, 4 steps, caption dropout 0.5, checkpoint at step 2 kept."""
    model = tmp_path_factory.mktemp("t2i") / "full"
    code = cli.main([str(a) for a in ["train", ph, "--out", model, "--base-model", sd, "--caption-template", TEMPLATE,
                                      "--caption-dropout", "0.5", "--steps", "4", "--seed", "5", "--checkpoint-every",
                                      "2", "--keep-checkpoints", *FAST]])
    assert code == 0
    return model


@pytest.fixture(scope="module")
def lora(sd, ph, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("t2i") / "lora"
    code = cli.main([str(a) for a in ["train", ph, "--out", model, "--base-model", sd, "--caption-template", TEMPLATE,
                                      "--finetune", "lora", "--lora-rank", "2", "--lr", "0.01", "--steps", "2", *FAST]])
    assert code == 0
    return model


def unet_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def changed_weights(a: Path, b: Path) -> list[str]:
    import torch

    wa, wb = unet_weights(a), unet_weights(b)
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


# ---------------------------------------------------------------- captions


def test_captions_from_template_and_metadata():
    from generators.text2image import build_captions, check_template_columns, template_fields
    from synthgate.errors import ConfigError, InputError
    from synthgate.imageset import ImageRecord

    def rec(key, label, **attrs):
        return ImageRecord(key=key, path=key, frame=0, n_frames=1, format="png", sha256="0" * 64, height=8, width=8,
                           channels=1, bit_depth=8, source_mode="L", label=label, attributes=tuple(attrs.items()))

    template = "OCT image of the {eye} eye showing {label}"
    assert template_fields(template) == ("eye", "label")
    records = [rec("a.png", "drusen", eye="left"), rec("b.png", "CNV", eye="right")]
    assert build_captions(template, records) == ["OCT image of the left eye showing drusen",
                                                 "OCT image of the right eye showing CNV"]
    assert build_captions("no placeholder", records) == ["no placeholder"] * 2
    with pytest.raises(InputError, match="'b.png' has no value for column 'eye'"):
        build_captions(template, [records[0], rec("b.png", "CNV")])
    with pytest.raises(InputError, match="'c.png' has no value for column 'label'"):
        build_captions(template, [rec("c.png", None, eye="left")])
    check_template_columns(template, ["path", "label", "eye"], "metadata.csv")
    with pytest.raises(InputError, match="column 'eye', which metadata.csv does not have"):
        check_template_columns(template, ["path", "label"], "metadata.csv")
    for bad in ("showing {0}", "showing {label!r}", "showing {label", "showing {label:>5}"):
        with pytest.raises(ConfigError):
            template_fields(bad)


def test_extra_metadata_columns_reach_the_captions(ph, tmp_path):
    from generators.data import open_training_set
    from generators.text2image import build_captions
    from synthgate.imageset import metadata_columns

    real = tmp_path / "set"
    shutil.copytree(ph, real)
    lines = (real / "metadata.csv").read_text().splitlines()
    (real / "metadata.csv").write_text("\n".join([lines[0] + ",view"] + [f"{ln},{'AP' if i % 2 else 'PA'}"
                                                                        for i, ln in enumerate(lines[1:])]) + "\n")
    assert metadata_columns(real) == ["path", "patient_id", "label", "sex", "age", "view"]
    training = open_training_set(real, 16, "none", extra_columns=["view"])
    captions = build_captions("{view} radiograph, class {label}", training.images.records)
    assert captions[0].startswith("PA radiograph, class ") and captions[1].startswith("AP radiograph, class ")


def test_caption_dropout_rate_and_its_state():
    from scipy.stats import binom

    from generators.text2image import CaptionDropout

    n, rate = 20_000, 0.1
    drop = CaptionDropout(rate, seed=7)
    state = drop.state_dict()
    count = int(drop.draw(n).sum())
    lo, hi = binom.ppf(1e-6, n, rate), binom.ppf(1 - 1e-6, n, rate)
    assert lo <= count <= hi, count
    again = CaptionDropout(rate, seed=99)
    again.load_state_dict(state)
    assert int(again.draw(n).sum()) == count  # the checkpointed state replays the same draws
    assert not CaptionDropout(0.0, seed=7).draw(1000).any()


# ---------------------------------------------------------------- training and the model directory


def test_full_finetune_writes_a_stable_diffusion_pipeline(full, sd, ph):
    import torch
    from diffusers import DiffusionPipeline

    from generators.text2image import unet_config_digest
    from synthgate.imageset import ImageSet

    info = json.loads((full / "synthgate.json").read_text())
    assert info["kind"] == "text2image" and info["resolution"] == 16 and info["image_channels"] == 1
    cond = info["conditioning"]
    assert cond["type"] == "text" and cond["template"] == TEMPLATE and cond["dropout"] == 0.5
    assert cond["captions"] == ["Phantom showing 0", "Phantom showing 1"] and cond["labels"] == ["0", "1"]
    assert info["training_set"]["sha256"] == ImageSet(ph).digest and info["seed"] == 5 and info["steps"] == 4
    assert info["base_model"]["unet_config_sha256"] == unet_config_digest(sd)
    assert info["base_model"]["finetune"] == "full"
    assert info["vae"]["latent_size"] == 8 and info["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert info["dp"] is None and "transformers" in info["versions"]
    assert changed_weights(sd, full)  # it did train
    pipe = DiffusionPipeline.from_pretrained(full)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.sample_size == 8
    image = pipe("Phantom showing 1", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_resume_equals_uninterrupted_training(full, sd, ph, tmp_path, capsys):
    ckpts = tmp_path / "resumed-checkpoints"
    shutil.copytree(full.parent / "full-checkpoints", ckpts)
    args = ["train", ph, "--out", tmp_path / "resumed", "--base-model", sd, "--caption-template", TEMPLATE,
            "--caption-dropout", "0.5", "--steps", "4", "--seed", "5", "--checkpoint-every", "2", *FAST]
    code, _, err = run(capsys, *args, "--resume")
    assert code == 0, err
    info = json.loads((tmp_path / "resumed" / "synthgate.json").read_text())
    assert info["training"]["resumed_from"] == 2
    assert changed_weights(full, tmp_path / "resumed") == []  # bit for bit
    assert info["training"]["history"] == json.loads((full / "synthgate.json").read_text())["training"]["history"]
    shutil.copytree(full.parent / "full-checkpoints", tmp_path / "other-checkpoints")
    other = [a if a != "0.5" else "0.2" for a in args]
    other[other.index(tmp_path / "resumed")] = tmp_path / "other"
    code, _, err = run(capsys, *other, "--resume")
    assert code == 2 and "different training config (text differ)" in err


def test_lora_trains_adapters_only_and_saves_them_merged(lora, sd):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from generators.text2image import LORA_TARGETS, add_lora, merged_unet

    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    add_lora(unet, 2)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 5, 32)).sample
    out.square().mean().backward()
    for n, p in unet.named_parameters():
        if p.requires_grad:
            p.data -= p.grad
    base_now = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_now[k], before[k]) for k in before)  # base weights untouched before the merge
    merged = merged_unet(unet, lora=True).state_dict()
    assert merged.keys() == before.keys()
    assert any(not torch.equal(merged[k], before[k]) for k in before)
    # the trained model: only the attention projections LoRA targets changed, and the adapter is saved alone
    changed = changed_weights(sd, lora)
    assert changed and all(any(f".{t}.weight" in k for t in LORA_TARGETS) for k in changed)
    adapter = load_file(lora / "lora" / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    info = json.loads((lora / "synthgate.json").read_text())
    assert info["base_model"]["finetune"] == "lora" and info["base_model"]["lora_rank"] == 2
    assert "peft" in info["versions"]


def test_dp_lora_per_example_gradients_are_exact(sd):
    """opacus' per-sample gradients of the LoRA parameters == autograd of each example's loss (DP-LoRA)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from opacus import GradSampleModule

    from generators.dp import fold_noise_multiplicity
    from generators.text2image import add_lora, wrap_unet
    from generators.train import diffusion_loss

    sched = DDPMScheduler.from_pretrained(sd / "scheduler")
    x, emb = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 32)

    def make():
        unet = UNet2DConditionModel.from_pretrained(sd / "unet")
        torch.manual_seed(0)
        add_lora(unet, 2)
        return wrap_unet(unet)

    ref = make()
    params = [p for p in ref.parameters() if p.requires_grad]
    losses = diffusion_loss(ref, sched, x, emb, 2, torch.Generator().manual_seed(1))
    direct = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                          for i in range(len(x))])
    net = make()
    gsm = GradSampleModule(net)
    diffusion_loss(gsm, sched, x, emb, 2, torch.Generator().manual_seed(1)).mean().backward()
    trained = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None for p in trained)
    fold_noise_multiplicity(trained, 2)
    folded = torch.cat([p.grad_sample.flatten(1) for p in trained], 1)
    assert folded.shape[0] == 3  # one gradient per example, not per noise draw
    assert torch.allclose(folded, direct, atol=1e-5 * float(direct.abs().max()), rtol=1e-4)


def test_dp_lora_trains_accounts_and_resumes_exactly(sd, ph, tmp_path, capsys):
    args = ["train", ph, "--base-model", sd, "--finetune", "lora", "--lora-rank", "2", "--steps", "2",
            "--dp-epsilon", "8", "--accountant", "rdp", "--checkpoint-every", "1",
            *[a for a in FAST if a != "--quiet"], "--json"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "dp", "--keep-checkpoints")
    assert code == 0, err
    shutil.copytree(tmp_path / "dp-checkpoints", tmp_path / "again-checkpoints")
    code, _, err = run(capsys, *args, "--out", tmp_path / "again", "--resume")
    assert code == 0, err
    assert changed_weights(tmp_path / "dp", tmp_path / "again") == []  # Poisson sample, noise, dropout replayed
    dp = json.loads((tmp_path / "dp" / "synthgate.json").read_text())["dp"]
    assert 0 < dp["epsilon_spent"] <= 8.0 and dp["noise_multiplier"] > 0
    assert json.loads(out)["dp"]["epsilon_target"] == 8
    changed = changed_weights(sd, tmp_path / "dp")
    assert changed and all(".to_" in k for k in changed)  # only the adapters' targets moved


# ---------------------------------------------------------------- sampling and attacks


def test_sampling_is_deterministic_records_prompts_and_follows_guidance(full, tmp_path, capsys):
    from PIL import Image

    from generators.loading import load_model
    from generators.sample import SamplerSettings, sample_one
    from synthgate.imageset import ImageSet

    args = ["sample", full, "--n", "2", "--steps", "2", "--seed", "3"]
    for name in ("a", "b"):
        code, _, err = run(capsys, *args, "--out", tmp_path / name)
        assert code == 0, err
    a, b = ImageSet(tmp_path / "a"), ImageSet(tmp_path / "b")
    assert np.array_equal(a.load(0), b.load(0)) and np.array_equal(a.load(1), b.load(1))
    # golden numbers (seed 3; identical with 1 and 2 torch threads): 8-bit images, so one pixel may move by one
    # level (0.004) on another CPU; the sums by a few levels
    assert_golden({"sum 0": float(a.load(0).sum(dtype=np.float64)), "sum 1": float(a.load(1).sum(dtype=np.float64)),
                   "[1] 8,8": float(a.load(1)[8, 8, 0])},
                  {"sum 0": 136.8784355968237, "sum 1": 137.46274948120117, "[1] 8,8": 0.43921568989753723},
                  rel=1e-4, abs=0.005)
    assert a.geometry().channels == 1  # gray training data stays gray through the RGB VAE
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["sampler"]["guidance_scale"] == 7.5
    assert [r["prompt"] for r in manifest["images"]] == ["Phantom showing 0", "Phantom showing 1"]
    meta = json.loads(Image.open(tmp_path / "a" / manifest["images"][1]["file"]).text["synthgate"])
    assert meta["prompt"] == "Phantom showing 1" and meta["guidance_scale"] == 7.5 and meta["label"] == "1"
    assert a.labels == ["0", "1"] and [r.attribute("prompt") for r in a.records] == ["Phantom showing 0",
                                                                                   "Phantom showing 1"]
    # one image again from its manifest seed alone, at the same guidance
    model = load_model(full)
    model.set_guidance(7.5)
    alone = sample_one(model, manifest["images"][1]["seed"], "1", SamplerSettings("ddim", 2))
    assert np.abs(alone - a.load(1).transpose(2, 0, 1)).max() <= 1 / 255 + 1e-6
    # guidance scale and a free prompt change the image
    code, _, err = run(capsys, *args, "--out", tmp_path / "g1", "--guidance-scale", "1")
    assert code == 0, err
    assert not np.array_equal(ImageSet(tmp_path / "g1").load(1), a.load(1))
    code, _, err = run(capsys, *args, "--out", tmp_path / "p", "--prompt", "a phantom with a lesion")
    assert code == 0, err
    records = json.loads((tmp_path / "p" / "manifest.json").read_text())["images"]
    assert {r["prompt"] for r in records} == {"a phantom with a lesion"} and {r["label"] for r in records} == {None}
    assert {r.attribute("prompt") for r in ImageSet(tmp_path / "p").records} == {"a phantom with a lesion"}
    assert not np.array_equal(ImageSet(tmp_path / "p").load(1), a.load(1))


def test_membership_attacks_run_conditioned_on_captions(full, ph):
    import torch

    from audit.membership_inference.model_attacks import loss_scores, pia_scores, secmi_scores
    from generators.loading import load_model
    from generators.text2image import TextDiffusionModel
    from synthgate.imageset import ImageSet

    model = load_model(full)
    assert isinstance(model, TextDiffusionModel) and model.labels == ["0", "1"] and model.latent
    images = ImageSet(ph)
    _, batch = next(images.iter_batches(4, images.geometry(), indices=[0, 1, 2, 3]))
    x0 = model.to_model_space(batch)
    cl = model.class_labels([images.records[i].label for i in range(4)])
    assert cl.shape == (4, 32, 32)
    assert torch.equal(cl[0], model.embed([model.caption(images.records[0].label)])[0])
    # the audit's path: each record's caption from its own metadata values (here the label-only template)
    assert torch.equal(model.condition_records(images.records[:4]), cl)
    scores = loss_scores(model, x0, cl, [50], 1, torch.Generator().manual_seed(0))
    assert scores.shape == (4, 1) and np.isfinite(scores).all()
    assert np.isfinite(pia_scores(model, x0, cl, [50])).all()
    assert np.isfinite(secmi_scores(model, x0, cl, 10, 10)).all()
    other = model.class_labels(["1" if r.label == "0" else "0" for r in images.records[:4]])
    assert not np.allclose(loss_scores(model, x0, other, [50], 1, torch.Generator().manual_seed(0)), scores)


def test_membership_check_attacks_the_text_model(full, ph, tmp_path, capsys):
    from audit.core.base import create_check
    from audit.core.context import AuditContext
    from synthgate.imageset import ImageSet

    code, _, err = run(capsys, "sample", full, "--n", "4", "--steps", "2", "--out", tmp_path / "syn")
    assert code == 0, err
    ctx = AuditContext(synthetic=ImageSet(tmp_path / "syn"), real=ImageSet(ph), holdout=ImageSet(ph.parent / "holdout"),
                       model=full, device="cpu")
    r = create_check("membership_inference", control_model=False, max_tpr_at_1pct_fpr=None, timesteps=[50],
                     noise_draws=1, pia_timesteps=[100], n_boot=100).run(ctx)
    assert r.status != "error", r.reason
    assert "attacks" in r.metrics, (r.status, r.reason, r.metrics)
    model_attacks = {n for n, a in r.metrics["attacks"].items() if a["scenario"] == 2}
    assert {"loss_t50", "pia_t100", "secmi_t100"} <= model_attacks


def test_sdxl_finetunes_samples_and_loads_in_diffusers(sd, ph, tmp_path, capsys):
    import torch
    from diffusers import DiffusionPipeline

    xl = tiny_stable_diffusion_xl(tmp_path, sd)
    code, _, err = run(capsys, "train", ph, "--out", tmp_path / "xl-model", "--base-model", xl, "--caption-template",
                       TEMPLATE, "--steps", "2", *FAST)
    assert code == 0, err
    info = json.loads((tmp_path / "xl-model" / "synthgate.json").read_text())
    assert info["base_model"]["family"] == "sdxl" and changed_weights(xl, tmp_path / "xl-model")
    args = ["sample", tmp_path / "xl-model", "--n", "2", "--steps", "2", "--seed", "1"]
    for name, scale in (("a", "7.5"), ("b", "7.5"), ("g", "1")):
        code, _, err = run(capsys, *args, "--guidance-scale", scale, "--out", tmp_path / name)
        assert code == 0, err
    a, b, g = (sorted((tmp_path / n).glob("*.png")) for n in "abg")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[1].read_bytes() != g[1].read_bytes()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "xl-model")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = pipe("Phantom showing 1", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------- bad inputs




def test_bad_inputs_give_clear_errors(sd, ph, tmp_path, capsys):
    def train(base, *extra):
        return run(capsys, "train", ph, "--out", tmp_path / "m", "--base-model", base, *FAST, *extra)

    no_unet = tmp_path / "no-unet"
    shutil.copytree(sd, no_unet)
    shutil.rmtree(no_unet / "unet")
    one_line_error(train(no_unet), "missing unet (unet/config.json)", "no-unet")
    no_tok = tmp_path / "no-tok"
    shutil.copytree(sd, no_tok)
    for f in (no_tok / "tokenizer").iterdir():
        f.unlink()
    one_line_error(train(no_tok), "missing tokenizer files", "no-tok")
    one_line_error(train(tmp_path / "nowhere"), "base model folder does not exist")
    xl = tmp_path / "xl"
    shutil.copytree(sd, xl)
    shutil.copytree(xl / "text_encoder", xl / "text_encoder_2")
    one_line_error(train(xl), "not a complete Stable Diffusion XL folder", "tokenizer_2")
    one_line_error(train(sd, "--caption-template", "{view} of {label}"), "'view'", "metadata.csv")
    one_line_error(train(sd, "--caption-dropout", "1.5"), "caption dropout")
    one_line_error(train(sd, "--dp-epsilon", "8"), "--finetune lora")
    one_line_error(run(capsys, "train", ph, "--out", tmp_path / "m", "--finetune", "lora"), "need --base-model")
    assert not (tmp_path / "m").exists()


def test_sampling_bad_inputs(full, ph, tmp_path, capsys):
    one_line_error(run(capsys, "sample", full, "--n", "2", "--label", "pneumonia", "--out", tmp_path / "s"),
                    "'pneumonia'", "0, 1")
    one_line_error(run(capsys, "sample", full, "--n", "2", "--guidance-scale", "-1", "--out", tmp_path / "s"),
                    "--guidance-scale")
    pixel = tmp_path / "pixel"
    assert run(capsys, "train", ph, "--out", pixel, "--resolution", "16", "--block-out-channels", "16,32",
               "--steps", "1", "--quiet")[0] == 0
    one_line_error(run(capsys, "sample", pixel, "--n", "2", "--prompt", "x", "--out", tmp_path / "s"),
                    "text-conditioned model")
    assert not (tmp_path / "s").exists()
