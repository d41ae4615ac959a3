"""insightface-format weights: written files run in a re-statement of insightface's forward with
identical outputs, their files load (architecture given or inferred), model.pretrained."""
import pytest
import torch
from omegaconf import OmegaConf

from partial_fc.models import get_model, infer_architecture, load_backbone, load_pretrained, save_backbone
from partial_fc.tools import export as export_tool
from partial_fc.train import builders
from partial_fc.train.config import ConfigError, validate_config

from tests.helpers.insightface_reference import FORWARDS


class _Recorder(dict):
    """A state_dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _trained_like(name, seed=0):
    """A model whose BN statistics and weights are off their initial values (eval mode)."""
    torch.manual_seed(seed)
    model = get_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


# Keys and shapes from insightface's code (backbones/*.py) for the default configurations.
PUBLISHED_SHAPES = {
    "r18": {"conv1.weight": (64, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
            "fc.weight": (512, 25088), "features.weight": (512,)},
    "mbf": {"layers.0.layers.0.weight": (128, 3, 3, 3),
            "layers.1.layers.0.weight": (128, 2, 3, 3),  # ConvBlock(..., groups=64)
            "layers.7.layers.1.layers.1.layers.0.weight": (256, 1, 3, 3),
            "conv_sep.layers.0.weight": (512, 256, 1, 1),
            "features.layers.0.layers.0.weight": (512, 1, 7, 7),
            "features.layers.2.weight": (512, 512), "features.layers.3.running_var": (512,)},
    "vit_t": {"patch_embed.proj.weight": (256, 3, 9, 9), "pos_embed": (1, 144, 256),
              "mask_token": (1, 1, 256), "blocks.11.attn.qkv.weight": (768, 256),
              "blocks.0.mlp.fc1.weight": (1024, 256), "feature.0.weight": (256, 36864),
              "feature.3.running_mean": (512,)},
}


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_insightface_file_runs_in_their_forward_with_identical_outputs(name, tmp_path):
    model = _trained_like(name)
    path = save_backbone(tmp_path / "backbone.pth", model, name, format="insightface")
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    for key, shape in PUBLISHED_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    if name == "mbf":  # the issue's insightface mbf file had 333 keys
        assert len(state) == 333
    x = torch.randn(2, 3, 112, 112)
    recorded = _Recorder(state)
    ref = FORWARDS[name](recorded, x)
    unread = {k for k in state if k not in recorded.read and not k.endswith("num_batches_tracked")}
    assert unread <= {"mask_token"}, unread  # ViT's mask token only acts in training
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["r18", "mbf"])  # vit_t: by the test above and inference
def test_their_state_dict_loads_inferred_or_named(name, tmp_path):
    model = _trained_like(name, seed=1)
    path = tmp_path / "backbone.pth"
    # insightface saves model.module.state_dict(); a DDP prefix is accepted too.
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = model(x)
        for arch in (None, name):
            loaded = load_backbone(path, arch=arch)
            assert not loaded.training
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_architecture_inference_and_its_errors(tmp_path):
    with torch.device("meta"):  # shapes only
        assert infer_architecture(get_model("r34", embedding_size=128).state_dict()) == \
            ("r34", {"embedding_size": 128})
        assert infer_architecture(get_model("mbf", blocks=(2, 8, 12, 4), scale=4).state_dict()) \
            == ("mbf", {"embedding_size": 512, "blocks": [2, 8, 12, 4], "scale": 4})
        for name in ("vit_t", "vit_s", "vit_b", "vit_l"):
            assert infer_architecture(get_model(name).state_dict())[0] == name

    odd = {k: v for k, v in get_model("r18").state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"cannot tell the architecture.*stage depths \(2, 2, 2, 1\)"
                                         r".*pass it \(--arch / arch=\) as one of r18, r34"):
        load_backbone(tmp_path / "odd.pth")
    # Named, but not what the file holds: the error lists what is missing and what is extra.
    with pytest.raises(ValueError, match=r"weights do not fit 'r18'.*18 missing keys.*"
                                         r"layer4\.1\.bn1\.weight"):
        load_backbone(tmp_path / "odd.pth", arch="r18")
    torch.save(get_model("r18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"weights do not fit 'r34'.*missing keys \[layer1\.2.*"
                                         r" 0 unexpected keys \[\]"):
        load_backbone(tmp_path / "r18.pth", arch="r34")
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a backbone file.*insightface.*keys \['epoch'\]"):
        load_backbone(tmp_path / "other.pth")


def test_pfc_export_writes_and_reads_insightface_files(tmp_path, capsys):
    model = _trained_like("r18", seed=2)
    ours = save_backbone(tmp_path / "ckpt" / "backbone.pt", model, "r18", {})
    out = tmp_path / "backbone.pth"
    assert export_tool.main([str(ours), str(out), "--format", "insightface"]) == 0
    assert '"arch": "r18"' in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert set(state) == set(model.state_dict())
    # ...and back: their file given as the input of pfc-export.
    assert export_tool.main([str(out), str(tmp_path / "again.pth"), "--format", "insightface",
                             "--arch", "r18"]) == 0
    for k, v in torch.load(tmp_path / "again.pth", weights_only=True).items():
        assert torch.equal(v, state[k]), k


def _model_cfg(**overrides):
    return OmegaConf.create({"name": "r18", "embedding_size": 512, "dropout": 0.0,
                             "activation_checkpointing": False, "pretrained": None, **overrides})


def test_model_pretrained_starts_from_either_format(tmp_path):
    source = _trained_like("r18", seed=3)
    their = save_backbone(tmp_path / "backbone.pth", source, "r18", format="insightface")
    ours = save_backbone(tmp_path / "ckpt" / "backbone.pt", source, "r18", {})
    for path in (their, ours, ours.parent):
        built = builders.build_backbone(_model_cfg(pretrained=str(path)))
        for (k, a), b in zip(built.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"pretrained weights do not fit the model: \d+ missing "
                                         r"keys \[layer1\.2\..*0 unexpected keys"):
        builders.build_backbone(_model_cfg(name="r34", pretrained=str(their)))
    # A classifier-free start: the backbone only, the training model untouched otherwise.
    fresh = get_model("r18")
    assert load_pretrained(fresh, their) is fresh


def test_config_refuses_a_missing_pretrained_file(tmp_path):
    from hydra import compose, initialize_config_dir
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=[f"model.pretrained={tmp_path / 'none.pth'}",
                                           f"output_root={tmp_path}"])
    with pytest.raises(ConfigError, match="model.pretrained must name an existing backbone"):
        validate_config(cfg)
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config", overrides=["model=vit_t", "model.mask_ratio=1.0"])
    with pytest.raises(ConfigError, match=r"model.mask_ratio must be in \[0, 1\)"):
        validate_config(cfg)
