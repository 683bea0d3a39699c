"""The denoiser registry (generators.denoisers): a new architecture is one module plus one registration.

A toy denoiser (one convolution) is registered here, in the test, and then
trained, checkpointed and resumed, saved, loaded and sampled through the
ordinary ``synthgate train`` / ``sample`` commands: nothing in generators/
names it.  The built-in entries are pinned to the model-directory contract
that old models were written with.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error
from synthgate import cli
from synthgate.errors import ConfigError
from synthgate.phantoms import write_phantoms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DP_REFUSAL = "dp: the toy denoiser is not private"
CLASS_REFUSAL = "conditioning `class`: the toy denoiser takes no labels (use --conditioning none)"
ATTRIBUTE_REFUSAL = "conditioning `attributes`: the toy denoiser takes no attributes"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@dataclass(frozen=True)
class ToyConfig:
    """The toy's settings block (``config["toy"]``)."""

    kernel: int = 3

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"toy.kernel {self.kernel} must be odd")

    def check_size(self, size: int, where: str = "resolution") -> None:
        if size < self.kernel:
            raise ConfigError(f"toy.kernel {self.kernel} is larger than the {where} {size}")


def toy_network_class():
    """One 3 x 3 convolution over the image and a timestep plane, as a diffusers model (save/load for free)."""
    import torch
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.modeling_utils import ModelMixin

    class ToyNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, channels: int = 1, kernel: int = 3):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels + 1, channels, kernel, padding=kernel // 2)

        def forward(self, sample, timestep, class_labels=None):
            if class_labels is not None:
                raise ValueError("the toy denoiser is unconditional")
            t = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype).reshape(-1)
            plane = (t / 1000).expand(sample.shape[0]).view(-1, 1, 1, 1).expand(-1, 1, *sample.shape[-2:])
            return Transformer2DModelOutput(sample=self.conv(torch.cat([sample, plane], 1)))

    return ToyNet


@pytest.fixture
def toy():
    """The toy registered for one test: its spec is the whole of what an architecture adds."""
    from generators.denoisers import Denoiser, register_denoiser, unregister_denoiser

    net = toy_network_class()

    def build(config, *, channels, size, num_classes, cond_dim):
        return net(channels=channels, kernel=config.arch_settings.kernel)

    spec = Denoiser(name="toy", folder="toynet", network=net, build=build, settings=ToyConfig,
                    refuse_dp=DP_REFUSAL, refuse_attributes=ATTRIBUTE_REFUSAL, refuse_classes=CLASS_REFUSAL,
                    presets={"toy-tiny": {"resolution": 16, "batch_size": 8, "lr_warmup_steps": 0,
                                          "learning_rate": 1e-2, "ema_decay": 0}})
    register_denoiser(spec)
    yield spec
    unregister_denoiser("toy")


@pytest.fixture(scope="module")
def ph16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "ph16"
    write_phantoms(out, patients=3, images_per_patient=3, size=16, seed=4)
    return out


def toy_weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model / "toynet" / "diffusion_pytorch_model.safetensors")


def test_a_registered_toy_trains_resumes_saves_loads_and_samples(toy, ph16, tmp_path, capsys):
    from generators.loading import load_model

    args = ["train", ph16 / "train", "--preset", "toy-tiny", "--steps", "4", "--checkpoint-every", "2", "--quiet"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "m", "--keep-checkpoints")
    assert code == 0, err
    info = json.loads((tmp_path / "m" / "synthgate.json").read_text())
    assert info["architecture"] == {"name": "toy", "folder": "toynet", "class": toy.class_path}
    assert info["config"]["toy"] == {"kernel": 3} and info["config"]["swin"] is None
    # the phantoms are labelled, but `auto` conditioning of an architecture without classes is unconditional
    assert info["conditioning"] == {"type": "none", "labels": None}
    assert (tmp_path / "m" / "toynet" / "config.json").exists() and (tmp_path / "m" / "scheduler").is_dir()
    assert not (tmp_path / "m" / "model_index.json").exists() and not (tmp_path / "m" / "unet").exists()

    # resumed from step 2, the run ends with the same weights bit for bit
    (tmp_path / "m-checkpoints" / "step-00000004.pt").unlink(missing_ok=True)
    (tmp_path / "r-checkpoints").mkdir()
    for ckpt in (tmp_path / "m-checkpoints").iterdir():
        (tmp_path / "r-checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    code, _, err = run(capsys, *args, "--out", tmp_path / "r", "--resume")
    assert code == 0, err
    a, b = toy_weights(tmp_path / "m"), toy_weights(tmp_path / "r")
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    model = load_model(tmp_path / "m")
    assert model.architecture == "toy" and isinstance(model.unet, toy.network) and model.sample_shape == (1, 16, 16)
    assert np.array_equal(model.unet.conv.weight.detach().numpy(), a["conv.weight"].numpy())
    code, _, err = run(capsys, "sample", tmp_path / "m", "--n", "3", "--out", tmp_path / "syn", "--steps", "2")
    assert code == 0, err
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert len(manifest["images"]) == 3 and all((tmp_path / "syn" / im["file"]).exists() for im in manifest["images"])


def test_training_the_toy_lowers_its_loss(toy):
    """An honest learning check through the registry's build: 4 images, the fixed-draw loss must halve."""
    import torch
    from accelerate import Accelerator

    from conftest import assert_training_halves_the_loss
    from generators.config import preset
    from generators.nets import build_denoiser, build_scheduler
    from generators.train import Trainer
    from synthgate.phantoms import generate

    images, _ = generate(patients=2, images_per_patient=2, size=16, seed=1, holdout_fraction=0)
    pixels = np.stack([im.pixels for im in images[:4]]).astype(np.float32)
    x = torch.as_tensor(pixels / pixels.max()).reshape(4, 1, 16, 16) * 2 - 1
    cfg = preset("toy-tiny", batch_size=4, steps=60, conditioning="none")
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_denoiser(cfg, 1, 16, None), build_scheduler(cfg, False), 4,
                      accelerator=Accelerator(cpu=True))
    assert_training_halves_the_loss(trainer, x, 8)


def test_the_toy_is_in_the_cli_and_its_refusals_are_one_line(toy, ph16, tmp_path, capsys):
    base = ["train", ph16 / "train", "--out", tmp_path / "m", "--print-config"]
    code, out, err = run(capsys, *base, "--architecture", "toy", "--resolution", "16")
    assert code == 0, err
    cfg = json.loads(out)
    assert cfg["architecture"] == "toy" and cfg["toy"] == {"kernel": 3} and cfg["dit"] is None
    (tmp_path / "k5.json").write_text(json.dumps({"architecture": "toy", "toy": {"kernel": 5}}))
    code, out, _ = run(capsys, *base, "--config", tmp_path / "k5.json")
    assert code == 0 and json.loads(out)["toy"] == {"kernel": 5}
    (tmp_path / "k4.json").write_text(json.dumps({"architecture": "toy", "toy": {"kernel": 4}}))
    one_line_error(run(capsys, *base, "--config", tmp_path / "k4.json"), "toy.kernel 4 must be odd")
    one_line_error(run(capsys, *base, "--preset", "toy-tiny", "--dp-epsilon", "8"), DP_REFUSAL)
    one_line_error(run(capsys, *base, "--preset", "toy-tiny", "--conditioning", "class"), CLASS_REFUSAL)
    one_line_error(run(capsys, *base, "--preset", "toy-tiny", "--condition-on", "exposure"), ATTRIBUTE_REFUSAL)
    # --architecture drops the settings block of another architecture, the toy's too
    code, out, err = run(capsys, *base, "--config", tmp_path / "k5.json", "--architecture", "dit")
    assert code == 0 and json.loads(out)["toy"] is None and json.loads(out)["architecture"] == "dit", err
    code, text, _ = run(capsys, "train", "--help")
    assert code == 0 and "toy-tiny" in text and "{unet,swin,dit,toy}" in text
    assert "(unet, swin, dit, toy)" in text and '"swin"/"dit"/"toy" block' in text


def test_a_model_of_an_unregistered_architecture_is_refused_by_name(toy, ph16, tmp_path, capsys):
    from generators.denoisers import unregister_denoiser, register_denoiser
    from generators.loading import load_model
    from synthgate.errors import InputError

    code, _, err = run(capsys, "train", ph16 / "train", "--out", tmp_path / "m", "--preset", "toy-tiny",
                       "--steps", "1", "--quiet")
    assert code == 0, err
    unregister_denoiser("toy")
    try:
        with pytest.raises(InputError, match="names architecture 'toy'; this synthgate knows unet, swin, dit"):
            load_model(tmp_path / "m")
        with pytest.raises(ConfigError, match="architecture 'toy' must be one of `unet`, `swin`, `dit`"):
            from generators.config import TrainConfig

            TrainConfig(architecture="toy")
    finally:
        register_denoiser(toy)  # the fixture unregisters it


def test_registration_refuses_clashes_and_incomplete_specs(toy):
    from generators.denoisers import Denoiser, register_denoiser

    def build(config, **_):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_denoiser(Denoiser(name="toy", folder="x", network="m:C", build=build, refuse_attributes="no"))
    with pytest.raises(ValueError, match="is a training setting"):
        register_denoiser(Denoiser(name="seed", folder="x", network="m:C", build=build, refuse_attributes="no"))
    with pytest.raises(ValueError, match="clashes with TrainConfig.replace"):
        register_denoiser(Denoiser(name="replace", folder="x", network="m:C", build=build, refuse_attributes="no"))
    with pytest.raises(ValueError, match="preset 'toy-tiny' is already defined"):
        register_denoiser(Denoiser(name="toy2", folder="x", network="m:C", build=build, refuse_attributes="no",
                                   presets={"toy-tiny": {}}))
    with pytest.raises(ValueError, match="condition_width .* or refuse_attributes"):
        Denoiser(name="toy3", folder="x", network="m:C", build=build)
    with pytest.raises(ValueError, match="must be a Python identifier"):
        Denoiser(name="toy-3", folder="x", network="m:C", build=build, refuse_attributes="no")


def test_builtin_entries_keep_the_model_directory_contract():
    """Folders and classes old model directories were written with (synthgate.json["architecture"])."""
    from generators.denoisers import architectures, get_denoiser
    from generators.config import PRESETS

    assert architectures() == ("unet", "swin", "dit")
    assert {name: get_denoiser(name).info() for name in architectures()} == {
        "unet": {"name": "unet", "folder": "unet", "class": "diffusers:UNet2DModel"},
        "swin": {"name": "swin", "folder": "denoiser", "class": "generators.swin:SwinUNetDenoiser"},
        "dit": {"name": "dit", "folder": "transformer", "class": "generators.dit:DiTDenoiser"}}
    assert list(PRESETS) == ["tiny", "base", "swin-tiny", "swin-base", "dit-tiny", "dit-base"]
    assert [get_denoiser(n).ddpm_pipeline for n in architectures()] == [True, False, False]
    assert [bool(get_denoiser(n).refuse_dp) for n in architectures()] == [False, True, False]
    assert [bool(get_denoiser(n).refuse_attributes) for n in architectures()] == [False, False, True]


def test_the_registry_and_train_help_do_not_import_torch():
    code = ("import sys; from generators.denoisers import denoisers, presets; "
            "from generators.config import PRESETS, preset; "
            "assert [d.name for d in denoisers()] == ['unet', 'swin', 'dit'] and len(presets()) == 6; "
            "preset('swin-base'); from synthgate import cli; assert cli.main(['train', '--help']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "--architecture {unet,swin,dit}" in result.stdout
