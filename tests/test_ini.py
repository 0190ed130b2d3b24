"""INI config files: MindSpore Lite's documented examples, round trips, and clear errors."""

from __future__ import annotations

import pathlib

import pytest

from jaxptq import ini
from jaxptq.config import ConfigError, QuantConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.cfg"))

# What each documented example must read as (flat keys); everything else is a default.
EXPECTED = {
    "common_quant_param.cfg": dict(
        quant_type="WEIGHT_QUANT",
        skip_quant_node=("node_name1", "node_name2", "node_name3"),
        debug_info_save_path="/home/workspace/mindspore/debug_info_save_path",
        enable_encode=True,
    ),
    "dynamic_quant.cfg": dict(quant_type="DYNAMIC_QUANT", quant_strategy="ALWC"),
    "fixed_bit_weight_quant.cfg": dict(
        quant_type="WEIGHT_QUANT", bit_num=8, min_quant_weight_channel=16
    ),
    "full_quant_ascend.cfg": dict(quant_type="FULL_QUANT", target_device="ASCEND"),
    "full_quant_ascend_dynamic_shape.cfg": dict(target_device="ASCEND"),
    "full_quant_cpu.cfg": dict(
        quant_type="FULL_QUANT",
        calibrate_path="input_name_1:/mnt/image/input_1_dir,input_name_2:input_2_dir",
        calibrate_size=100,
        input_type="IMAGE",
        image_to_format="RGB",
        normalize_mean=(127.5, 127.5, 127.5),
        normalize_std=(127.5, 127.5, 127.5),
        resize_width=224,
        resize_height=224,
        resize_method="LINEAR",
        center_crop_width=224,
        center_crop_height=224,
        activation_quant_method="MAX_MIN",
        bias_correction=True,
        target_device=None,
    ),
    "full_quant_dsp.cfg": dict(target_device="DSP", bias_correction=False),
    "full_quant_nvgpu.cfg": dict(target_device="NVGPU", per_channel=True),
    "full_quant_per_channel.cfg": dict(per_channel=True),
    "full_quant_per_layer.cfg": dict(per_channel=False),
    "kv_cache_quant.cfg": dict(kv_enable=True, kv_granularity="PER_TOKEN_HEAD", kv_bits=8),
    "mixed_bit_weight_quant.cfg": dict(
        bit_num=0, min_quant_weight_size=5000, min_quant_weight_channel=5, init_scale=0.02
    ),
    "post_training_legacy.cfg": dict(
        quant_type="FULL_QUANT",
        calibrate_path="/mnt/image/input_1_dir",
        calibrate_size=100,
        activation_quant_method="MAX_MIN",
        bias_correction=True,
    ),
    "weight_quant_on_the_fly.cfg": dict(
        quant_type="WEIGHT_QUANT", min_quant_weight_size=5000, per_channel=True
    ),
}
WARNS = {"full_quant_ascend_dynamic_shape.cfg", "weight_quant_on_the_fly.cfg"}


def _read(path: pathlib.Path) -> QuantConfig:
    if path.name in WARNS:
        with pytest.warns(ini.ConfigWarning, match="ascend_context"):
            return ini.read_config(path)
    return ini.read_config(path)


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES} == set(EXPECTED)
    assert len(EXAMPLES) >= 12


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_round_trips(path, tmp_path):
    cfg = _read(path)
    flat = cfg.to_flat()
    for key, value in EXPECTED[path.name].items():
        assert flat[key] == value, key
    out = tmp_path / "again.cfg"
    cfg.to_ini(str(out))
    again = QuantConfig.from_ini(str(out))
    assert again == cfg
    assert ini.format_config(again) == out.read_text()


def test_documented_spellings_and_defaults():
    text = """
# comment
[common_quant_param]
quant_type = full_quant
bit_num=8
skip_quant_node = conv1 , conv2,,
enable_encode = TRUE
[full_quant_param]
activation_quant_method=RemovalOutlier
bias_correction=False
[data_preprocess_param]
normalize_mean=[0.5,0.25 ,1]
normalize_std = 2, 4, 8
"""
    cfg = ini.parse_config(text, "spellings.cfg")
    flat = cfg.to_flat()
    assert flat["quant_type"] == "FULL_QUANT"
    assert flat["skip_quant_node"] == ("conv1", "conv2")
    assert flat["activation_quant_method"] == "REMOVAL_OUTLIER"
    assert flat["bias_correction"] is False
    assert flat["normalize_mean"] == (0.5, 0.25, 1.0)
    assert flat["normalize_std"] == (2.0, 4.0, 8.0)
    # MindSpore's defaults for keys left out.
    assert flat["min_quant_weight_size"] == 0
    assert flat["min_quant_weight_channel"] == 16
    assert flat["per_channel"] is True
    assert flat["init_scale"] == 0.02
    assert flat["calibrate_size"] == 100
    assert flat["quant_strategy"] == "ALWC"


def test_weight_quant_param_maps_per_channel():
    cfg = ini.parse_config(
        "[common_quant_param]\nquant_type=WEIGHT_QUANT\n[weight_quant_param]\nper_channel=false\n"
    )
    assert cfg.full_quant_param.per_channel is False
    with pytest.warns(ini.ConfigWarning, match="no equivalent"):
        ini.parse_config("[weight_quant_param]\nbias_correction=true\n", "w.cfg")


def test_legacy_flat_file_defaults_and_bin_detection(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 4)
    cfg = ini.parse_config(f"image_path={tmp_path}\n", "legacy.cfg")
    assert cfg.quant_type == "FULL_QUANT"
    assert cfg.full_quant_param.activation_quant_method == "KL"  # r1.x default
    assert cfg.full_quant_param.bias_correction is False  # r1.x default
    assert cfg.data_preprocess_param.input_type == "BIN"
    with pytest.warns(ini.ConfigWarning, match="thread_num"):
        ini.parse_config("image_path=/x\nthread_num=4\n", "legacy.cfg")


BAD = [
    (
        "[common_quant_parm]\nquant_type=WEIGHT_QUANT\n",
        "unknown section [common_quant_parm]",
        "[common_quant_param]",
    ),
    (
        "[common_quant_param]\nquant_typ=WEIGHT_QUANT\n",
        "bad.cfg:2: unknown key `quant_typ`",
        "`quant_type`",
    ),
    ("[common_quant_param]\nbit_num=eight\n", "bad.cfg:2:", "`bit_num` must be an integer"),
    ("[common_quant_param]\n\nbit_num=17\n", "bad.cfg:3:", "out of range 0..16"),
    (
        "[common_quant_param]\nquant_type=HALF_QUANT\n",
        "bad.cfg:2:",
        "choose one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT",
    ),
    ("[full_quant_param]\nbias_correction=yes\n", "bad.cfg:2:", "must be true or false"),
    ("[data_preprocess_param]\nnormalize_mean=[1, two]\n", "bad.cfg:2:", "vector of numbers"),
    ("[data_preprocess_param]\nnormalize_std=[1, 0, 1]\n", "bad.cfg:2:", "must not contain 0"),
    ("[data_preprocess_param]\ncalibrate_size=0\n", "bad.cfg:2:", "`calibrate_size`"),
    ("[data_preprocess_param]\nresize_method=BILINEAR\n", "bad.cfg:2:", "LINEAR, NEAREST, CUBIC"),
    (
        "[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=4\n",
        "bad.cfg:3:",
        "not supported with FULL_QUANT",
    ),
    ("[common_quant_param]\nbit_num=8\nbit_num=4\n", "bad.cfg:3:", "set twice (first on line 2)"),
    ("quant_type=WEIGHT_QUANT\n[common_quant_param]\n", "bad.cfg:1:", "before any section"),
    ("[common_quant_param\nbit_num=8\n", "bad.cfg:1:", "malformed section header"),
    ("[common_quant_param]\nbit_num 8\n", "bad.cfg:2:", "expected `key=value`"),
    ("[full_quant_param]\ntarget_device=TPU\n", "bad.cfg:2:", "CPU, NVGPU, DSP, ASCEND"),
    ("[weight_quant_param]\ndequant_strategy=OFFLINE\n", "bad.cfg:2:", "ON_THE_FLY"),
    (
        "[full_quant_param]\nper_channel=true\n[weight_quant_param]\nper_channel=false\n",
        "bad.cfg:4:",
        "contradicts [full_quant_param] `per_channel` on line 2",
    ),
    ("image_path=/x\nbatch_size=10\n", "bad.cfg:2: unknown key `batch_size`", "`batch_count`"),
    ("image_path=/x\nmethod_x=MEAN\n", "bad.cfg:2:", "`activation_quant_method` (from `method_x`)"),
    ("[kv_cache_quant_param]\nkv_bits=1\n", "bad.cfg:2:", "out of range 2..8"),
    ("[mixed_bit_weight_quant_param]\ninit_scale=2\n", "bad.cfg:2:", "init_scale"),
]


@pytest.mark.parametrize(("text", "where", "what"), BAD)
def test_malformed_config_names_file_line_and_fix(text, where, what, tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ini.read_config(path)
    message = str(info.value)
    assert where in message
    assert what in message
    assert "bad.cfg" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ini.read_config(tmp_path / "nope.cfg")


def test_write_is_atomic_and_refuses_unwritable_names(tmp_path):
    out = tmp_path / "cfg" / "x.cfg"
    ini.write_config(QuantConfig.create(skip_quant_node=("a", "b/c")), out)
    assert ini.read_config(out).common_quant_param.skip_quant_node == ("a", "b/c")
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="comma-separated"):
        ini.write_config(QuantConfig.create(skip_quant_node=("a,b",)), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.cfg"]
