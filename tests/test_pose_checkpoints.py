import json
import zipfile

import pytest
import torch

from instantid_colab.pose.checkpoints import (CheckpointError, checkpoint_filter_fn, inspect_checkpoint,
                                              load_pose_model, write_released_checkpoint)
from instantid_colab.pose.cli import main
from instantid_colab.pose.model import ConvNeXtPose
from instantid_colab.pose.variants import VARIANTS

PARAMS = {"XS": 3_528_008, "S": 7_438_976, "M": 7_587_008, "L": 8_380_352}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: ConvNeXtPose(variant) for name, variant in VARIANTS.items()}


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layout,key_format", [("zip", "named"), ("zip", "indexed"), ("directory", "indexed"),
                                               ("bare", "named")])
def test_released_formats_identify_and_load_strictly(tmp_path, models, name, layout, key_format):
    path = write_released_checkpoint(tmp_path / f"ConvNeXtPose_{name}.tar", models[name], epoch=83,
                                     key_format=key_format, layout=layout)
    model, info = load_pose_model(path)
    variant = VARIANTS[name]
    assert (info.variant, info.depth_dim, info.head_channels, info.heatmap_size) == (
        name, variant.depth_dim, variant.head_channels, variant.heatmap_size)
    assert info.params == PARAMS[name]
    assert info.key_format == key_format
    assert info.module_prefix == (layout != "bare")
    assert info.epoch == (None if layout == "bare" else 83)
    assert _same_weights(model, models[name])
    assert not model.training


def test_release_layout_and_optimizer_state_load_with_weights_only(tmp_path, models):
    path = write_released_checkpoint(tmp_path / "ConvNeXtPose_XS.tar", models["XS"], epoch=68, optimizer_steps=1)
    names = zipfile.ZipFile(path).namelist()
    assert "snapshot_68.pth/data.pkl" in names
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "network", "optimizer"}
    assert next(iter(raw["network"])).startswith("module.backbone.")
    assert len(raw["optimizer"]["state"]) == len(list(models["XS"].parameters()))
    assert inspect_checkpoint(path).has_optimizer


def test_unzipped_folder_parent_or_root(tmp_path, models):
    folder = write_released_checkpoint(tmp_path / "ConvNeXtPose_S", models["S"], epoch=67, layout="directory")
    assert (folder / "snapshot_67.pth" / "data.pkl").is_file()
    assert inspect_checkpoint(folder).variant == "S"
    assert inspect_checkpoint(folder / "snapshot_67.pth").variant == "S"


def test_filter_maps_indexed_head_keys():
    tensor = torch.zeros(1)
    state, key_format, prefixed = checkpoint_filter_fn({
        "module.head.deconv_layers_2.0.weight": tensor, "module.head.deconv_layers_2.1.running_var": tensor,
        "module.head.deconv_layers_3.2.bias": tensor, "module.backbone.stages.0.1.norm.weight": tensor})
    assert list(state) == ["head.deconv_layers_2.dwconv.weight", "head.deconv_layers_2.norm.running_var",
                           "head.deconv_layers_3.pwconv.bias", "backbone.stages.0.1.norm.weight"]
    assert (key_format, prefixed) == ("indexed", True)


def test_wrong_joint_count_names_variant_and_rows(tmp_path, models):
    state = {k: v.clone() for k, v in models["L"].state_dict().items()}
    state["head.final_layer.weight"] = torch.zeros(21 * 64, 512, 1, 1)  # a MuCo 21-joint head
    state["head.final_layer.bias"] = torch.zeros(21 * 64)
    torch.save(state, tmp_path / "muco.pth")
    with pytest.raises(CheckpointError) as error:
        inspect_checkpoint(tmp_path / "muco.pth")
    message = str(error.value)
    assert "ConvNeXtPose-L" in message and "1344 rows" in message and "21 joints x 64" in message
    assert "18 joints x depth_dim 64 = 1152" in message


def test_shape_mismatch_lists_keys_and_shapes(tmp_path, models):
    state = {k: v.clone() for k, v in models["XS"].state_dict().items()}
    state["backbone.stages.2.0.pwconv1.weight"] = torch.zeros(600, 160, 1, 1)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"ConvNeXtPose-XS.*backbone\.stages\.2\.0\.pwconv1\.weight: "
                                              r"file \(600, 160, 1, 1\) vs model \(640, 160, 1, 1\)"):
        load_pose_model(tmp_path / "edited.pth")


def test_truncated_file_says_download_again(tmp_path, models):
    path = write_released_checkpoint(tmp_path / "ConvNeXtPose_XS.tar", models["XS"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*download it again"):
        inspect_checkpoint(path)


def test_cli_inspect_json(tmp_path, models, capsys):
    path = write_released_checkpoint(tmp_path / "ConvNeXtPose_M.tar", models["M"], epoch=70, key_format="indexed")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info[k] for k in ("variant", "depth_dim", "head_channels", "params", "epoch", "key_format")} == {
        "variant": "M", "depth_dim": 64, "head_channels": 256, "params": 7_587_008, "epoch": 70,
        "key_format": "indexed"}
    assert main(["inspect", str(tmp_path / "missing.tar")]) == 1
    assert "Checkpoint not found" in capsys.readouterr().err
