"""Transformer denoisers (Swin-UNet, DiT) in ``synthgate train`` / ``sample``.

16 x 16 phantoms and transformers of a few thousand parameters, a few steps
each: the point is that each property holds (training, learning, sampling
determinism, save/load, conditioning, DP), not image quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synthgate import cli
from synthgate.phantoms import write_phantoms
from conftest import assert_golden, assert_training_halves_the_loss, one_line_error

# two blocks at the first level: the second uses shifted windows (an attention mask)
SWIN = {"architecture": "swin", "swin": {"embed_dim": 16, "depths": [2, 1], "num_heads": [1, 2], "window_size": 4}}
DIT = {"architecture": "dit", "dit": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}}
TINY = {"swin": SWIN, "dit": DIT}
COMMON = {"resolution": 16, "batch_size": 8, "lr_warmup_steps": 0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err




def config_file(tmp: Path, arch: str, **extra) -> Path:
    path = tmp / f"{arch}.json"
    path.write_text(json.dumps({**COMMON, **TINY[arch], **extra}))
    return path


@pytest.fixture(scope="module")
def ph16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tgen") / "ph16"
    write_phantoms(out, patients=4, images_per_patient=3, size=16, seed=3)
    return out


@pytest.fixture(scope="module")
def trained(ph16, tmp_path_factory):
    """A class-conditional pixel model of each architecture, 3 steps through ``generators.run.train``."""
    from generators.config import TrainConfig
    from generators.run import train

    root = tmp_path_factory.mktemp("tmodels")
    out = {}
    for arch in TINY:
        cfg = TrainConfig.from_dict({**COMMON, **TINY[arch], "steps": 3, "seed": 5})
        result = train(ph16 / "train", root / arch, cfg, device="cpu", progress=False)
        assert result.steps_run == 3 and np.isfinite(result.final_loss)
        out[arch] = root / arch
    return out


# ---------------------------------------------------------------- config


def test_presets_and_architectures_round_trip():
    from generators.config import PRESETS, DiTConfig, SwinConfig, TrainConfig, preset

    for name in PRESETS:
        dp = None if preset(name).architecture == "swin" else {"epsilon": 4.0}
        cfg = preset(name, seed=3, dp=dp)
        again = TrainConfig.from_dict(json.loads(cfg.to_json()))
        assert again == cfg and again.to_dict() == cfg.to_dict()
    assert preset("swin-tiny").resolution == 32 and isinstance(preset("swin-tiny").swin, SwinConfig)
    assert preset("dit-base").dit == DiTConfig(patch_size=4, num_layers=12, num_attention_heads=12,
                                               attention_head_dim=64)
    assert preset("swin-base").swin.num_heads == (3, 6, 12, 24) and preset("tiny").swin is None
    # choosing an architecture without its settings fills the defaults; the UNet default is unchanged
    assert TrainConfig(architecture="dit").dit == DiTConfig() and TrainConfig().architecture == "unet"
    for arch in TINY:
        cfg = TrainConfig.from_dict({**COMMON, **TINY[arch]})
        assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("settings, needle", [
    ({"architecture": "swin", "swin": {"window_size": 3}}, "swin.window_size 3 does not divide the 16 x 16"),
    ({"architecture": "swin", "swin": {"window_size": 3}, "vae": "x"}, None),  # latent size: checked at train
    ({"architecture": "swin", "swin": {"depths": [2, 2]}}, "swin.num_heads has 3 entries but swin.depths has 2"),
    ({"architecture": "swin", "swin": {"num_heads": [3, 4, 8]}}, "swin.num_heads[0] = 3 must divide"),
    ({"architecture": "swin", "swin": {"patch_size": 3}}, "swin.patch_size 3 must divide the resolution 32"),
    ({"architecture": "swin", "resolution": 20}, "token grid 10 (resolution 20 / swin.patch_size 2) must be"),
    ({"architecture": "swin", "swin": {"windowsize": 4}}, "unknown swin setting 'windowsize' (did you mean"),
    ({"architecture": "dit", "dit": {"patch_size": 3}}, "dit.patch_size 3 must divide"),
    ({"architecture": "dit", "dit": {"num_layers": 0}}, "dit.num_layers 0 must be at least 1"),
    ({"swin": {}}, "swin settings were given but architecture is 'unet'"),
    ({"architecture": "vit"}, "architecture 'vit' must be one of"),
    ({"architecture": "swin", "dp": {"epsilon": 8}}, "opacus cannot train architecture 'swin'"),
])
def test_bad_settings_name_the_setting(settings, needle):
    from generators.config import TrainConfig
    from synthgate.errors import ConfigError

    if needle is None:
        TrainConfig.from_dict(settings)
        return
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(settings)
    assert needle in str(exc.value)


def test_cli_architecture_flag_and_presets(tmp_path, capsys):
    base = ["train", "x", "--out", tmp_path / "m", "--print-config"]
    code, out, err = run(capsys, *base, "--preset", "swin-tiny")
    assert code == 0, err
    assert json.loads(out)["architecture"] == "swin" and json.loads(out)["swin"]["window_size"] == 4
    code, out, err = run(capsys, *base, "--preset", "swin-tiny", "--architecture", "dit")
    cfg = json.loads(out)
    assert code == 0 and cfg["architecture"] == "dit" and cfg["swin"] is None and cfg["dit"]["num_layers"] == 4
    code, out, _ = run(capsys, *base, "--architecture", "swin", "--resolution", "16")
    assert code == 0 and json.loads(out)["swin"]["patch_size"] == 2
    one_line_error(run(capsys, *base, "--preset", "swin-tiny", "--dp-epsilon", "8"),
                   "opacus cannot train architecture 'swin'", "WindowAttention")
    one_line_error(run(capsys, *base, "--preset", "swin-tiny", "--resolution", "40"), "swin.window_size 4")


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["swin", "dit"])
def test_an_overfit_run_reduces_the_loss(arch):
    """An honest learning check: 4 images, 40 steps; the loss on fixed (t, noise) draws must halve."""
    import torch
    from accelerate import Accelerator

    from generators.config import TrainConfig
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import Trainer
    from synthgate.phantoms import generate

    images, _ = generate(patients=2, images_per_patient=2, size=16, seed=1, holdout_fraction=0)
    pixels = np.stack([im.pixels for im in images[:4]]).astype(np.float32)
    x = torch.as_tensor(pixels / pixels.max()).reshape(4, 1, 16, 16) * 2 - 1
    cfg = TrainConfig.from_dict({**COMMON, **TINY[arch], "batch_size": 4, "steps": 40, "learning_rate": 3e-3,
                                 "ema_decay": 0, "conditioning": "none"})
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_denoiser(cfg, 1, 16, None), build_scheduler(cfg, False), 4,
                      accelerator=Accelerator(cpu=True))

    assert_training_halves_the_loss(trainer, x, 8)


@pytest.mark.parametrize("arch", ["swin", "dit"])
def test_model_dir_names_its_architecture_and_training_is_reproducible(arch, trained, ph16, tmp_path):
    from safetensors.torch import load_file

    from generators.config import TrainConfig
    from generators.loading import load_model
    from generators.run import train

    model = trained[arch]
    info = json.loads((model / "synthgate.json").read_text())
    folder = {"swin": "denoiser", "dit": "transformer"}[arch]
    assert info["architecture"]["name"] == arch and info["architecture"]["folder"] == folder
    assert info["config"]["architecture"] == arch and info["conditioning"]["labels"] == ["0", "1"]
    assert (model / folder / "config.json").exists() and not (model / "unet").exists()
    loaded = load_model(model)
    assert loaded.architecture == arch and loaded.sample_shape == (1, 16, 16) and loaded.labels == ["0", "1"]
    # the same seed trains the same weights (DiT's label dropout would draw from the global RNG)
    cfg = TrainConfig.from_dict(info["config"])
    train(ph16 / "train", tmp_path / "again", cfg, device="cpu", progress=False)
    weights = [load_file(m / folder / "diffusion_pytorch_model.safetensors") for m in (model, tmp_path / "again")]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])


def test_resumed_dit_run_equals_the_uninterrupted_one(ph16, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    args = ["train", ph16 / "train", "--config", config_file(tmp_path, "dit"), "--steps", "4",
            "--checkpoint-every", "2", "--quiet"]
    assert run(capsys, *args, "--out", tmp_path / "full", "--keep-checkpoints")[0] == 0
    (tmp_path / "full-checkpoints" / "step-00000004.pt").unlink(missing_ok=True)
    shutil.copytree(tmp_path / "full-checkpoints", tmp_path / "resumed-checkpoints")
    code, _, err = run(capsys, *args, "--out", tmp_path / "resumed", "--resume")
    assert code == 0, err
    assert json.loads((tmp_path / "resumed" / "synthgate.json").read_text())["training"]["resumed_from"] == 2
    a, b = (load_file(m / "transformer" / "diffusion_pytorch_model.safetensors")
            for m in (tmp_path / "full", tmp_path / "resumed"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("arch", ["swin", "dit"])
def test_save_load_round_trip_gives_identical_outputs(arch, tmp_path):
    import torch

    from generators.config import TrainConfig
    from generators.nets import build_denoiser, load_denoiser

    cfg = TrainConfig.from_dict({**COMMON, **TINY[arch]})
    torch.manual_seed(0)
    net = build_denoiser(cfg, 2, 16, 3).eval()
    x, t, y = torch.randn(3, 2, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        before = net(x, t, class_labels=y).sample
    net.save_pretrained(tmp_path / "net")
    again = load_denoiser(arch, tmp_path / "net").eval()
    with torch.no_grad():
        after = again(x, t, class_labels=y).sample
    assert before.shape == x.shape and torch.equal(before, after)
    if arch == "dit":  # plain diffusers reads the folder too
        from diffusers import DiTTransformer2DModel

        plain = DiTTransformer2DModel.from_pretrained(tmp_path / "net").eval()
        with torch.no_grad():
            assert torch.equal(plain(x, timestep=t, class_labels=y).sample, before)


# ----------------------------------------------------------------- sampling


@pytest.mark.parametrize("arch", ["swin", "dit"])
def test_sampling_is_deterministic_per_seed_and_per_image(arch, trained):
    from generators.loading import load_model
    from generators.sample import SamplerSettings, denoise, generate, plan, sample_one

    model = load_model(trained[arch])
    items = plan(model, 3, seed=11)
    settings = SamplerSettings("ddim", 3)
    first = np.concatenate([imgs for _, imgs in generate(model, items, settings)])
    second = np.concatenate([imgs for _, imgs in generate(model, items, settings)])
    assert first.shape == (3, 1, 16, 16) and np.array_equal(first, second)
    alone = sample_one(model, items[1].seed, items[1].label, settings)
    assert np.allclose(alone, first[1], atol=1e-5)
    assert not np.allclose(denoise(model, plan(model, 3, seed=12), settings), first)
    # golden numbers (seed 11): with 2 torch threads one pixel moved by 7.6e-6 (relative), the means not at all
    assert_golden({"mean": float(first.mean()), "[1,0,8,8]": float(first[1, 0, 8, 8])},
                  {"swin": {"mean": 0.5154209136962891, "[1,0,8,8]": 0.011811554431915283},
                   "dit": {"mean": 0.5351626873016357, "[1,0,8,8]": 0.0002657473087310791}}[arch], rel=1e-4, abs=1e-5)


def test_class_conditional_swin_uses_its_labels_and_a_conditioning_vector(trained):
    import torch

    from generators.loading import load_model
    from generators.swin import SwinUNetDenoiser

    model = load_model(trained["swin"])
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    t = torch.tensor([300, 300])
    eps = model.predict_eps(x, t, model.class_labels(["0", "1"]))
    assert not torch.allclose(eps[0], eps[1])  # same noise, different label -> different prediction
    assert torch.equal(model.predict_eps(x, t, model.class_labels(["1", "1"]))[1], eps[1])
    with pytest.raises(ValueError, match="conditional"):
        model.unet(x, t)
    # a float conditioning vector (multi-attribute conditioning), projected into the timestep embedding
    torch.manual_seed(0)
    net = SwinUNetDenoiser(sample_size=16, in_channels=1, embed_dim=8, depths=(1, 1), num_heads=(1, 2), cond_dim=5)
    cond = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = net(x, t, class_labels=cond).sample
        b = net(x, t, class_labels=cond.flip(0)).sample
    assert a.shape == x.shape and not torch.allclose(a[0], a[1]) and torch.allclose(a[0], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="class embedding"):
        net(x, t, class_labels=torch.tensor([0, 1]))


def test_cli_trains_and_samples_a_latent_swin_model(tmp_path, capsys):
    import torch
    from diffusers import AutoencoderKL

    from generators.loading import load_model

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, sample_size=16).save_pretrained(tmp_path / "sd-vae")
    write_phantoms(tmp_path / "ph", patients=3, images_per_patient=2, size=16, seed=2)
    # latents are 8 x 8: the windows must tile the latent token grid, known only once the VAE is read
    args = ["train", tmp_path / "ph" / "train", "--vae", tmp_path / "sd-vae", "--steps", "2", "--quiet"]
    bad = config_file(tmp_path, "swin", swin={**SWIN["swin"], "window_size": 3})
    one_line_error(run(capsys, *args, "--config", bad, "--out", tmp_path / "bad"),
                   "swin.window_size 3 does not divide the 4 x 4 token grid of level 0 (latent size 8)")
    cfg = config_file(tmp_path, "swin")
    code, _, err = run(capsys, *args, "--config", cfg, "--out", tmp_path / "ldm")
    assert code == 0, err
    model = load_model(tmp_path / "ldm")
    assert model.latent and model.architecture == "swin" and model.sample_shape == (4, 8, 8)
    code, _, err = run(capsys, "sample", tmp_path / "ldm", "--n", "2", "--out", tmp_path / "syn", "--steps", "2")
    assert code == 0, err
    assert len(json.loads((tmp_path / "syn" / "manifest.json").read_text())["images"]) == 2


def test_membership_attacks_run_unchanged_on_a_swin_model(trained, ph16):
    import torch

    from audit.membership_inference.model_attacks import loss_scores, pia_scores, secmi_scores
    from generators.loading import load_model
    from synthgate.imageset import ImageSet

    model = load_model(trained["swin"])
    real = ImageSet(ph16 / "train")
    x0 = model.to_model_space(np.stack([real.load(i) for i in range(4)]).transpose(0, 3, 1, 2))
    labels = model.class_labels(real.labels[:4])
    scores = [loss_scores(model, x0, labels, [50, 200], 2, torch.Generator().manual_seed(0)),
              pia_scores(model, x0, labels, [100, 200]), secmi_scores(model, x0, labels, t_sec=100, k=10)]
    assert all(np.isfinite(s).all() and len(s) == 4 for s in scores)


def test_old_model_dirs_without_architecture_load_as_unet(tmp_path):
    from audit.membership_inference.control_model import save_model_dir, tiny_unet
    from generators.config import TrainConfig
    from generators.loading import load_model
    from generators.nets import build_scheduler
    from synthgate.errors import InputError

    save_model_dir(tmp_path / "old", tiny_unet(16, 1), build_scheduler(TrainConfig(resolution=16), False))
    assert "architecture" not in json.loads((tmp_path / "old" / "synthgate.json").read_text())
    model = load_model(tmp_path / "old")
    assert model.architecture == "unet" and model.sample_shape == (1, 16, 16)
    info = json.loads((tmp_path / "old" / "synthgate.json").read_text())
    (tmp_path / "old" / "synthgate.json").write_text(json.dumps({**info, "architecture": {"name": "vit"}}))
    with pytest.raises(InputError, match="names architecture 'vit'; this synthgate knows unet, swin, dit"):
        load_model(tmp_path / "old")


# ----------------------------------------------------------------------- DP


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_dit_per_example_gradients_are_exact():
    """opacus hooks on DiT (Linear, Conv2d, Embedding; a reused embedding) == per-example autograd."""
    import torch
    from opacus import GradSampleModule

    from generators.config import TrainConfig
    from generators.dp import contiguous_conv_inputs, fold_noise_multiplicity
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import diffusion_loss

    cfg = TrainConfig.from_dict({**COMMON, **DIT})
    sched, k = build_scheduler(cfg, False), 2
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 1])

    def make():
        torch.manual_seed(0)
        return build_denoiser(cfg, 1, 16, 2)

    ref = make()
    params = list(ref.parameters())
    losses = diffusion_loss(ref, sched, x, y, k, torch.Generator().manual_seed(1))
    direct = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                          for i in range(len(x))])
    net = make()
    contiguous_conv_inputs(net)
    diffusion_loss(GradSampleModule(net), sched, x, y, k, torch.Generator().manual_seed(1)).mean().backward()
    fold_noise_multiplicity(list(net.parameters()), k)
    folded = torch.cat([p.grad_sample.flatten(1) for p in net.parameters()], 1)
    assert folded.shape[0] == 3
    assert torch.allclose(folded, direct, atol=1e-5 * float(direct.abs().max()), rtol=1e-4)


def test_dp_dit_trains_within_its_budget(ph16, tmp_path, capsys):
    code, _, err = run(capsys, "train", ph16 / "train", "--out", tmp_path / "dp", "--config",
                       config_file(tmp_path, "dit"), "--steps", "3", "--dp-epsilon", "8", "--accountant", "rdp",
                       "--quiet")
    assert code == 0, err
    dp = json.loads((tmp_path / "dp" / "synthgate.json").read_text())["dp"]
    assert 0 < dp["epsilon_spent"] <= 8.0 and dp["noise_multiplier"] > 0


@pytest.mark.parametrize("functorch", [False, True])
def test_dp_swin_is_refused_because_opacus_really_fails(functorch):
    """The refusal is not a guess: opacus rejects timm's WindowAttention in both modes."""
    import torch
    from opacus import GradSampleModule

    from generators.config import TrainConfig
    from generators.nets import build_denoiser

    net = build_denoiser(TrainConfig.from_dict({**COMMON, **SWIN}), 1, 16, None)
    with pytest.raises(NotImplementedError, match="WindowAttention"):
        GradSampleModule(net, force_functorch=functorch)
    assert any(type(m).__name__ == "WindowAttention" for m in net.modules()) and isinstance(net, torch.nn.Module)
