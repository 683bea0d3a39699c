"""generators: config, training (plain, DP, latent), resume, sampling, writing, CLI.

Everything runs on CPU with 16 x 16 phantoms and UNets of widths (16, 32),
a few steps each: the point is that each property holds, not image quality.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthgate import cli
from synthgate.phantoms import write_phantoms
from conftest import assert_golden, assert_training_halves_the_loss, one_line_error

TINY = ["--resolution", "16", "--block-out-channels", "16,32", "--batch-size", "8"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ph16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "ph16"
    write_phantoms(out, patients=6, images_per_patient=4, size=16, seed=3)
    return out


@pytest.fixture(scope="module")
def trained(ph16, tmp_path_factory):
    """A class-conditional pixel model, 4 steps, checkpoints at step 2 kept."""
    model = tmp_path_factory.mktemp("gen") / "model"
    code = cli.main(["train", str(ph16 / "train"), "--out", str(model), *TINY, "--steps", "4", "--seed", "5",
                     "--checkpoint-every", "2", "--keep-checkpoints", "--json"])
    assert code == 0
    return model


def unet_weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = unet_weights(a), unet_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- config


def test_config_round_trips_and_checks_at_load():
    from generators.config import PRESETS, TrainConfig, preset
    from synthgate.errors import ConfigError

    for name in PRESETS:  # swin refuses DP (tests/test_generators_transformers.py)
        dp = None if PRESETS[name].get("architecture") == "swin" else {"epsilon": 4.0, "delta": 1e-6}
        cfg = preset(name, seed=3, dp=dp, noise_multiplicity=4)
        again = TrainConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg and again.to_dict() == cfg.to_dict()
    assert preset("base").resolution == 128 and preset("tiny").resolution == 32
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(ConfigError, match="`epsilon`, `v_prediction` or `sample`|must be one of"):
        TrainConfig(prediction_type="x0")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        TrainConfig(block_out_channels=(12, 32), attention=(False, False))
    with pytest.raises(ConfigError, match="dp.epsilon"):
        TrainConfig(dp={"epsilon": 0})


def test_cli_print_config_merges_preset_file_and_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 7\nlearning_rate: 0.01\n")
    code, out, _ = run(capsys, "train", "x", "--out", tmp_path / "m", "--config", tmp_path / "c.yaml",
                       "--lr", "0.02", "--dp-epsilon", "3", "--print-config")
    cfg = json.loads(out)
    assert code == 0 and cfg["steps"] == 7 and cfg["learning_rate"] == 0.02 and cfg["dp"]["epsilon"] == 3.0
    code, _, err = run(capsys, "train", "x", "--out", tmp_path / "m", "--dp-delta", "1e-6", "--print-config")
    assert code == 2 and "--dp-epsilon" in err


# ----------------------------------------------------------------- training


def test_a_few_steps_reduce_the_loss(ph16):
    import torch
    from accelerate import Accelerator

    from generators.config import TrainConfig
    from generators.data import PixelSource, open_training_set
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import Trainer

    training = open_training_set(ph16 / "train", 16, "none")
    x = torch.as_tensor(PixelSource(training)(range(len(training))))
    cfg = TrainConfig(resolution=16, block_out_channels=(16, 32), attention=(False, False), batch_size=8, steps=6,
                      learning_rate=3e-3, lr_warmup_steps=0, ema_decay=0)
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_denoiser(cfg, 1, 16, None), build_scheduler(cfg, False), len(x),
                      accelerator=Accelerator(cpu=True))

    assert_training_halves_the_loss(trainer, x, 4)


def test_model_dir_contract_and_plain_diffusers_load(trained, ph16):
    from diffusers import DDPMPipeline, DiffusionPipeline

    from generators.loading import load_model
    from synthgate.imageset import ImageSet

    info = json.loads((trained / "synthgate.json").read_text())
    real = ImageSet(ph16 / "train")
    assert info["kind"] == "pixel" and info["resolution"] == 16 and info["image_channels"] == 1
    assert info["conditioning"] == {"type": "class", "labels": ["0", "1"]}
    assert info["training_set"]["sha256"] == real.digest and info["training_set"]["n_images"] == len(real)
    assert info["training_set"]["n_patients"] == real.n_patients and info["seed"] == 5 and info["steps"] == 4
    assert info["dp"] is None and info["config"]["steps"] == 4 and "torch" in info["versions"]
    assert "MRN" not in (trained / "synthgate.json").read_text()  # counted, never named
    pipe = DiffusionPipeline.from_pretrained(trained)
    assert isinstance(pipe, DDPMPipeline) and pipe.unet.config.num_class_embeds == 2
    model = load_model(trained)
    assert model.labels == ["0", "1"] and model.resolution == 16 and not model.latent


def test_resume_equals_uninterrupted_training(trained, ph16, tmp_path, capsys):
    ckpts = tmp_path / "resumed-checkpoints"
    shutil.copytree(trained.parent / "model-checkpoints", ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002.pt"]
    code, out, err = run(capsys, "train", ph16 / "train", "--out", tmp_path / "resumed", *TINY, "--steps", "4",
                         "--seed", "5", "--checkpoint-every", "2", "--resume", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["resumed_from"] == 2 and summary["steps_run"] == 2  # it did continue, not retrain
    assert same_weights(trained, tmp_path / "resumed")
    a, b = (json.loads((m / "synthgate.json").read_text())["training"] for m in (trained, tmp_path / "resumed"))
    assert a["history"] == b["history"]
    assert not ckpts.exists()  # removed once the model is saved (no --keep-checkpoints)
    # another config cannot resume from these checkpoints
    shutil.copytree(trained.parent / "model-checkpoints", tmp_path / "other-checkpoints")
    code, _, err = run(capsys, "train", ph16 / "train", "--out", tmp_path / "other", *TINY, "--steps", "4",
                       "--seed", "6", "--checkpoint-every", "2", "--resume")
    assert code == 2 and "different training config (seed differ)" in err


def test_dp_training_spends_at_most_the_target_and_resumes_exactly(ph16, tmp_path, capsys):
    dp = ["--dp-epsilon", "8", "--accountant", "rdp", "--noise-multiplicity", "2", "--conditioning", "none"]
    args = ["train", ph16 / "train", *TINY, "--steps", "4", "--seed", "1", "--checkpoint-every", "2", *dp]
    code, _, err = run(capsys, *args, "--out", tmp_path / "dp", "--keep-checkpoints", "--quiet")
    assert code == 0, err
    info = json.loads((tmp_path / "dp" / "synthgate.json").read_text())["dp"]
    assert 0 < info["epsilon_spent"] <= 8.0 and np.isfinite(info["epsilon_spent"])
    assert info["epsilon_target"] == 8.0 and info["noise_multiplier"] > 0.5 and info["noise_multiplicity"] == 2
    spent = [e for _, e in info["epsilon_history"]]
    assert spent == sorted(spent) and len(spent) == 4 and spent[-1] == info["epsilon_spent"]
    assert info["accountant"] == "rdp" and info["sampling"] == "poisson" and info["history"][0][2] == 4
    # resume from step 2: same weights, same accountant history, same epsilon
    (tmp_path / "dp-checkpoints" / "step-00000004.pt").unlink(missing_ok=True)
    shutil.copytree(tmp_path / "dp-checkpoints", tmp_path / "again-checkpoints")
    code, _, err = run(capsys, *args, "--out", tmp_path / "again", "--resume", "--quiet")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "synthgate.json").read_text())
    assert again["training"]["resumed_from"] == 2 and again["dp"]["history"] == info["history"]
    assert again["dp"]["epsilon_spent"] == info["epsilon_spent"]
    assert same_weights(tmp_path / "dp", tmp_path / "again")
    # an unconditional pixel model samples in plain diffusers
    from diffusers import DiffusionPipeline

    images = DiffusionPipeline.from_pretrained(tmp_path / "dp")(batch_size=2, num_inference_steps=2,
                                                                 output_type="np").images
    assert images.shape == (2, 16, 16, 1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_per_example_gradients_are_exact_with_noise_multiplicity():
    """opacus' per-row grads folded over K draws == autograd of each example's K-averaged loss."""
    import torch
    from opacus import GradSampleModule

    from generators.config import TrainConfig
    from generators.dp import contiguous_conv_inputs, fold_noise_multiplicity
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import diffusion_loss

    # attention at the second level: where stock opacus returns zero conv gradients
    cfg = TrainConfig(resolution=16, block_out_channels=(16, 32), attention=(False, True))
    sched, k = build_scheduler(cfg, False), 3
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 1])

    def make():
        torch.manual_seed(0)
        return build_denoiser(cfg, 1, 16, 2)

    ref = make()
    losses = diffusion_loss(ref, sched, x, y, k, torch.Generator().manual_seed(1))
    direct = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], list(ref.parameters()),
                                                                              retain_graph=True)])
                          for i in range(len(x))])
    net = make()
    contiguous_conv_inputs(net)
    gsm = GradSampleModule(net)
    diffusion_loss(gsm, sched, x, y, k, torch.Generator().manual_seed(1)).mean().backward()
    params = list(net.parameters())
    fold_noise_multiplicity(params, k)
    folded = torch.cat([p.grad_sample.flatten(1) for p in params], 1)
    assert folded.shape[0] == 3  # one gradient per example, not per noise draw
    assert torch.allclose(folded, direct, atol=1e-5 * float(direct.abs().max()), rtol=1e-4)


def test_dp_step_on_an_empty_poisson_batch_still_adds_noise_and_is_accounted():
    import torch

    from generators.config import DPConfig, TrainConfig
    from generators.dp import PrivateTraining
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import diffusion_loss

    cfg = TrainConfig(resolution=16, block_out_channels=(16, 32), attention=(False, False))
    unet = build_denoiser(cfg, 1, 16, None)
    opt = torch.optim.SGD(unet.parameters(), lr=1.0)
    private = PrivateTraining(unet, opt, n_examples=10, batch_size=5, steps=3,
                              dp=DPConfig(epsilon=5.0, accountant="rdp"), noise_multiplicity=2,
                              sample_generator=torch.Generator().manual_seed(0),
                              noise_generator=torch.Generator().manual_seed(1), noise_multiplier=1.0)
    assert private.sample_rate == 0.5 and private.expected_batch_size == 5
    before = [p.detach().clone() for p in unet.parameters()]

    def loss(module, x, y):
        return diffusion_loss(module, build_scheduler(cfg, False), x, y, 2, torch.Generator().manual_seed(2))

    assert np.isnan(private.step(loss, torch.zeros(0, 1, 16, 16), None))
    assert all(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))  # noise, no data
    assert private.engine.accountant.history == [(1.0, 0.5, 1)] and 0 < private.epsilon() < float("inf")
    assert np.isfinite(private.step(loss, torch.randn(3, 1, 16, 16), None))
    assert private.engine.accountant.history == [(1.0, 0.5, 2)]


def test_dp_refuses_modules_opacus_cannot_handle():
    import torch

    from generators.dp import check_compatible
    from synthgate.errors import UsageError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4))
    with pytest.raises(UsageError, match=r"1 \(BatchNorm2d"):
        check_compatible(net)
    check_compatible(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4)))


def test_latent_diffusion_with_a_tiny_vae(tmp_path, capsys):
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline
    from PIL import Image

    from generators.loading import load_model

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, sample_size=16).save_pretrained(tmp_path / "sd-vae")
    # 32 x 32 16-bit phantoms: resized to 16 (recorded), and sampled back as 16-bit PNGs
    write_phantoms(tmp_path / "ph", patients=5, images_per_patient=2, size=32, seed=2, bit_depth=16)
    code, _, err = run(capsys, "train", tmp_path / "ph" / "train", "--out", tmp_path / "ldm", *TINY, "--steps", "2",
                       "--vae", tmp_path / "sd-vae", "--quiet")
    assert code == 0, err
    info = json.loads((tmp_path / "ldm" / "synthgate.json").read_text())
    assert info["kind"] == "latent" and info["vae"]["latent_channels"] == 4 and info["vae"]["latent_size"] == 8
    assert info["training_set"]["resized"] == ["sizes 32x32 resized to 16x16"] and info["bit_depth"] == 16
    assert isinstance(AutoencoderKL.from_pretrained(tmp_path / "ldm" / "vae"), AutoencoderKL)
    DiffusionPipeline.from_pretrained(tmp_path / "ldm")
    model = load_model(tmp_path / "ldm")
    assert model.latent and model.sample_shape == (4, 8, 8)
    assert tuple(model.to_model_space(np.random.rand(2, 1, 16, 16)).shape) == (2, 4, 8, 8)
    code, _, err = run(capsys, "sample", tmp_path / "ldm", "--n", "2", "--out", tmp_path / "syn", "--steps", "2")
    assert code == 0, err
    img = Image.open(tmp_path / "syn" / "synthetic_000000.png")
    assert img.size == (16, 16) and img.mode.startswith("I;16")


# ----------------------------------------------------------------- sampling


def test_sampling_is_deterministic_per_seed_and_per_image(trained):
    from generators.loading import load_model
    from generators.sample import SamplerSettings, denoise, generate, plan, sample_one

    model = load_model(trained)
    items = plan(model, 3, seed=11)
    assert [it.label for it in items] == ["0", "1", "0"] and len({it.seed for it in items}) == 3
    golden = {}
    for settings in (SamplerSettings("ddim", 4), SamplerSettings("ddpm", 4), SamplerSettings("dpm", 4)):
        first = np.concatenate([imgs for _, imgs in generate(model, items, settings)])
        second = np.concatenate([imgs for _, imgs in generate(model, items, settings)])
        assert np.array_equal(first, second)
        golden |= {f"{settings.name} mean": float(first.mean()), f"{settings.name} [1,0,8,8]": float(first[1, 0, 8, 8])}
        # any single image from its own seed, without its batch
        alone = sample_one(model, items[1].seed, items[1].label, settings)
        assert np.allclose(alone, first[1], atol=1e-5)
    other = denoise(model, plan(model, 3, seed=12), SamplerSettings("ddim", 4))
    assert not np.allclose(other, first)
    # golden numbers (seed 11): the model trained 4 steps; with 2 torch threads one pixel moved by 2.7e-6 (relative)
    assert_golden(golden, {"ddim mean": 0.5224878191947937, "ddim [1,0,8,8]": 0.40437987446784973,
                           "ddpm mean": 0.484777569770813, "ddpm [1,0,8,8]": 0.5665934085845947,
                           "dpm mean": 0.5122438073158264, "dpm [1,0,8,8]": 0.0}, rel=1e-4, abs=1e-5)


def test_cli_sample_png_manifest_provenance_and_audit_inputs(trained, ph16, tmp_path, capsys):
    from PIL import Image

    from audit.core.inputs import resolve_inputs
    from generators.loading import model_digest
    from synthgate.imageset import ImageSet

    out = tmp_path / "syn"
    code, _, err = run(capsys, "sample", trained, "--n", "4", "--out", out, "--steps", "3", "--seed", "2")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"path": str(trained.resolve()), "sha256": model_digest(trained)}
    assert manifest["training_set"]["sha256"] == ImageSet(ph16 / "train").digest
    assert manifest["sampler"]["name"] == "ddim" and manifest["sampler"]["steps"] == 3
    assert manifest["counts"] == {"0": 2, "1": 2} and manifest["synthetic"] is True
    synthetic = ImageSet(out)
    assert synthetic.has_labels and sorted(synthetic.labels) == ["0", "0", "1", "1"] and not synthetic.has_patients
    for record, image in zip(manifest["images"], synthetic.records):
        assert record["file"] == image.path
        meta = json.loads(Image.open(out / record["file"]).text["synthgate"])
        assert meta["synthetic"] and meta["seed"] == record["seed"] and meta["model"] == {"sha256": manifest["model"]["sha256"]}
    # the manifest names the real set and the model; a manifest may not send the audit outside the folder that
    # holds the synthetic set, so here (the data lies elsewhere) they must be given explicitly
    from synthgate.errors import InputError

    with pytest.raises(InputError, match="pass --real"):
        resolve_inputs(out, None, None, None)
    inputs = resolve_inputs(out, ph16 / "train", None, trained)
    assert inputs.real == ph16 / "train" and inputs.model == trained
    near = trained.parent / "syn-near"  # beside the model and data: the manifest's paths are used
    shutil.copytree(out, near)
    if (ph16 / "train").resolve().is_relative_to(near.resolve().parent):
        assert resolve_inputs(near).real == (ph16 / "train").resolve()
    # per-label counts
    code, _, err = run(capsys, "sample", trained, "--per-label", "1=3", "--out", tmp_path / "one", "--steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["counts"] == {"1": 3}


def test_cli_sample_dicom_is_marked_synthetic_without_identifiers(trained, tmp_path, capsys):
    import pydicom

    from synthgate.imageset import ImageSet

    args = ["sample", trained, "--n", "2", "--steps", "2", "--seed", "4", "--bit-depth", "16"]
    assert run(capsys, *args, "--out", tmp_path / "dcm", "--format", "dicom")[0] == 0
    assert run(capsys, *args, "--out", tmp_path / "png")[0] == 0
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    uids = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.ConversionType == "SYN" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientIdentityRemoved == "YES"
        assert "synthetic" in ds.DerivationDescription.lower() and json.loads(ds.ImageComments)["synthetic"]
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == 2
    dcm, png = ImageSet(tmp_path / "dcm"), ImageSet(tmp_path / "png")
    assert dcm.has_labels
    for i in range(2):  # same seeds: the same pixels, whichever the format
        assert np.allclose(dcm.load(i), png.load(i), atol=1 / 65535)


# --------------------------------------------------------------- bad inputs




def test_bad_inputs_give_clear_errors(trained, tmp_path, capsys):
    from conftest import write_png

    (tmp_path / "empty").mkdir()
    one_line_error(run(capsys, "train", tmp_path / "empty", "--out", tmp_path / "m"), "no images")
    write_png(tmp_path / "mixed" / "a.png", np.zeros((16, 16), np.uint8))
    write_png(tmp_path / "mixed" / "b.png", np.zeros((16, 16, 3), np.uint8))
    one_line_error(run(capsys, "train", tmp_path / "mixed", "--out", tmp_path / "m", *TINY),
                    "mixes channel counts", "a.png", "b.png")
    one_line_error(run(capsys, "train", tmp_path / "mixed", "--out", tmp_path / "m", *TINY,
                        "--vae", tmp_path / "no-vae"), "VAE folder does not exist", "no-vae")
    (tmp_path / "not-a-vae").mkdir()
    one_line_error(run(capsys, "train", tmp_path / "mixed", "--out", tmp_path / "m", *TINY,
                        "--vae", tmp_path / "not-a-vae"), "not a diffusers AutoencoderKL folder")
    one_line_error(run(capsys, "train", tmp_path / "mixed", "--out", trained), "already exists")
    one_line_error(run(capsys, "sample", trained, "--n", "2", "--label", "pneumonia", "--out", tmp_path / "s"),
                    "'pneumonia'", "0, 1")
    one_line_error(run(capsys, "sample", tmp_path / "mixed", "--n", "2", "--out", tmp_path / "s"), "synthgate.json")
    one_line_error(run(capsys, "sample", trained, "--n", "2", "--sampler", "euler", "--out", tmp_path / "s"),
                    "invalid choice")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_checkpoint_dir_is_never_an_input_and_only_checkpoints_are_removed(ph16, trained, tmp_path, capsys):
    """Red team: `--checkpoint-dir` naming the training set deleted it whole once the model was saved."""
    before = sorted(p.name for p in (ph16 / "train").iterdir())
    one_line_error(run(capsys, "train", ph16 / "train", "--out", tmp_path / "m", *TINY, "--steps", "2",
                       "--checkpoint-dir", ph16 / "train"), "--checkpoint-dir", "real input")
    assert sorted(p.name for p in (ph16 / "train").iterdir()) == before and not (tmp_path / "m").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("important")
    code, _, err = run(capsys, "train", ph16 / "train", "--out", tmp_path / "m2", *TINY, "--steps", "2",
                       "--checkpoint-every", "1", "--checkpoint-dir", notes)
    assert code == 0, err
    assert [p.name for p in notes.iterdir()] == ["a.txt"] and (notes / "a.txt").read_text() == "important"


def test_a_model_whose_weights_are_a_symlink_is_refused(trained, tmp_path):
    """Red team: weights behind a symlink were loaded but not hashed, and were swapped after the audit."""
    from generators.loading import model_digest
    from synthgate.errors import InputError

    model = tmp_path / "linked"
    shutil.copytree(trained, model, ignore=shutil.ignore_patterns("*-checkpoints"))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "w.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    with pytest.raises(InputError, match="symbolic link"):
        model_digest(model)
    assert len(model_digest(trained)) == 64


def test_non_finite_eta_and_epsilon_are_refused(trained, ph16, tmp_path, capsys):
    one_line_error(run(capsys, "sample", trained, "--n", "2", "--eta", "nan", "--out", tmp_path / "s"), "--eta")
    one_line_error(run(capsys, "train", ph16 / "train", "--out", tmp_path / "m", *TINY, "--dp-epsilon", "inf"),
                   "finite")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_train_help_does_not_import_torch():
    code = ("import sys; from synthgate import cli; "
            "rc = [cli.main(a) for a in (['train', '--help'], ['sample', '--help'])]; "
            "assert rc == [0, 0], rc; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
