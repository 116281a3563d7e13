"""ModelConfig: presets, TOML/JSON files, overrides, field errors and Hugging Face config.json."""

from __future__ import annotations

import json
import warnings

import pytest

from longcat.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    from_dict,
    from_hf_config,
    load_config,
    parse_overrides,
    preset,
    to_hf_config,
)


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    da, db = a.to_dict(), b.to_dict()
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}


# --- presets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_and_validate(name):
    cfg = preset(name)
    assert isinstance(cfg, ModelConfig)
    cfg.validate()
    assert cfg.to_dict() == {**ModelConfig().to_dict(), **{k: type(getattr(cfg, k))(v) for k, v in PRESETS[name].items()}}


def test_preset_values_follow_the_reference_table():
    lc2 = preset("longcat2")
    assert (lc2.vocab_size, lc2.hidden_size, lc2.num_layers, lc2.num_attention_heads) == (163840, 8192, 38, 64)
    assert (lc2.n_routed_experts, lc2.zero_expert_num, lc2.moe_topk, lc2.routed_scaling_factor) == (768, 128, 12, 9.0)
    assert (lc2.oe_neighbor_num, lc2.oe_split_num, lc2.ngram_branches) == (5, 4, 16)
    assert (lc2.index_n_heads, lc2.index_head_dim, lc2.index_topk) == (32, 128, 2048)
    assert (lc2.index_init_tokens, lc2.index_local_tokens, lc2.mtp_num_layers) == (16, 1024, 3)
    assert (lc2.yarn_factor, lc2.yarn_original_max_position_embeddings, lc2.rope_theta) == (120.0, 8192, 1e6)
    lite = preset("flash-lite")
    assert (lite.hidden_size, lite.num_layers, lite.oe_vocab_size_ratio, lite.yarn_factor) == (3072, 14, 78.0, 10.0)
    tiny = preset("tiny")  # the unit-test toy has every feature on
    assert tiny.ngram_enabled and tiny.lsa_enabled and tiny.yarn_enabled and tiny.mtp_num_layers >= 1
    assert tiny.zero_expert_num > 0


def test_preset_overrides_and_unknown_preset():
    assert preset("tiny", hidden_size=128).hidden_size == 128
    with pytest.raises(ConfigError, match="nonexistent"):
        preset("nonexistent")


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".json"])
@pytest.mark.parametrize("name", ["tiny", "longcat2"])
def test_file_roundtrip(tmp_path, name, suffix):
    cfg = preset(name, oe_scale_word_embedding=False, rms_norm_eps=3e-6)
    path = tmp_path / f"model{suffix}"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg, _diff(cfg, again)


def test_toml_with_preset_and_top_level_table(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[model]\npreset = "tiny"\nhidden_size = 128\nyarn_factor = 2\n')
    cfg = load_config(path)
    assert cfg == preset("tiny", hidden_size=128, yarn_factor=2.0)
    assert isinstance(cfg.yarn_factor, float)
    path.write_text('preset = "small"\nnum_layers = 3\n')  # no [model] table
    assert load_config(path) == preset("small", num_layers=3)


def test_unknown_field_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="hiden_size"):
        preset("tiny", hiden_size=64)
    with pytest.raises(ConfigError, match="hiden_size"):
        from_dict({"hiden_size": 64})
    path = tmp_path / "bad.toml"
    path.write_text('[model]\npreset = "tiny"\nnum_expert = 4\n')
    with pytest.raises(ConfigError, match="num_expert"):
        load_config(path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**preset("tiny").to_dict(), "moe_top_k": 2}))
    with pytest.raises(ConfigError, match="moe_top_k"):
        load_config(path)


def test_ill_typed_field_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size"):
        preset("tiny", hidden_size="big")
    with pytest.raises(ConfigError, match="hidden_size"):
        preset("tiny", hidden_size=True)  # a bool is not an int here
    with pytest.raises(ConfigError, match="hidden_size"):
        preset("tiny", hidden_size=64.5)
    with pytest.raises(ConfigError, match="oe_scale_word_embedding"):
        preset("tiny", oe_scale_word_embedding=1)
    path = tmp_path / "bad.toml"
    path.write_text('[model]\npreset = "tiny"\nrope_theta = "ten thousand"\n')
    with pytest.raises(ConfigError, match="rope_theta"):
        load_config(path)
    # lossless numeric coercions are fine
    cfg = preset("tiny", hidden_size=64.0, routed_scaling_factor=3)
    assert cfg.hidden_size == 64 and isinstance(cfg.hidden_size, int)
    assert cfg.routed_scaling_factor == 3.0 and isinstance(cfg.routed_scaling_factor, float)


def test_relations_between_fields_are_checked():
    with pytest.raises(ConfigError, match="moe_topk"):
        preset("tiny", moe_topk=13)  # N + Z = 12
    with pytest.raises(ConfigError, match="hidden_size"):
        preset("tiny", hidden_size=66)  # not divisible by the 4 n-gram branches
    with pytest.raises(ConfigError, match="index_topk"):
        preset("tiny", index_topk=10)  # < 4 sinks + 8 local
    with pytest.raises(ConfigError, match="yarn_original_max_position_embeddings"):
        preset("small", yarn_factor=4.0)
    with pytest.raises(ConfigError, match="eos_token_id"):
        preset("tiny", eos_token_id=512)


def test_missing_or_unparsable_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        load_config(path)


# --- overrides --------------------------------------------------------------------------------------


def test_parse_overrides_types_values():
    out = parse_overrides(
        ["hidden_size=512", "yarn_factor=4", "oe_scale_word_embedding=false", "index-topk=1e3", "rope_theta=1e6"]
    )
    assert out == {
        "hidden_size": 512, "yarn_factor": 4.0, "oe_scale_word_embedding": False, "index_topk": 1000,
        "rope_theta": 1e6,
    }
    assert type(out["hidden_size"]) is int and type(out["yarn_factor"]) is float and type(out["index_topk"]) is int
    assert parse_overrides(["oe_scale_word_embedding=1"]) == {"oe_scale_word_embedding": True}
    assert preset("tiny", **parse_overrides(["num_layers=3", "moe_topk=2"])).num_layers == 3


@pytest.mark.parametrize(
    "item, name",
    [
        ("hidden_size", "hidden_size"),  # no '='
        ("hiden_size=5", "hiden_size"),
        ("hidden_size=big", "hidden_size"),
        ("hidden_size=12.5", "hidden_size"),
        ("oe_scale_word_embedding=maybe", "oe_scale_word_embedding"),
        ("yarn_factor=x", "yarn_factor"),
    ],
)
def test_parse_overrides_errors_name_the_field(item, name):
    with pytest.raises(ConfigError, match=name):
        parse_overrides([item])


# --- Hugging Face config.json -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_roundtrip(name):
    cfg = preset(name)
    again = from_hf_config(to_hf_config(cfg))
    assert again == cfg, f"fields lost in to_hf_config -> from_hf_config: {_diff(cfg, again)}"


def test_hf_config_roundtrip_through_a_directory(tmp_path):
    cfg = preset("tiny", yarn_mscale_all_dim=0.707, yarn_beta_fast=16.0, mla_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    assert load_config(tmp_path) == cfg


def test_hf_config_carries_yarn_and_longcat2_keys():
    cfg = preset("tiny", mtp_num_layers=2)
    hf = to_hf_config(cfg)
    assert hf["model_type"] == "longcat_flash" and hf["head_dim"] == cfg.qk_rope_head_dim
    assert hf["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    }
    assert (hf["oe_vocab_size_ratio"], hf["oe_neighbor_num"], hf["oe_split_num"]) == (2.0, 3, 2)
    assert (hf["index_n_heads"], hf["index_head_dim"], hf["index_topk"]) == (2, 16, 24)
    assert (hf["index_init_tokens"], hf["index_local_tokens"], hf["mtp_num_layers"]) == (4, 8, 2)
    plain = to_hf_config(preset("small"))
    assert plain["rope_scaling"] is None
    assert not any(k.startswith(("oe_", "index_")) for k in plain)


def test_hf_aliases_and_rope_parameters():
    base = to_hf_config(preset("tiny"))
    for key in ("oe_vocab_size_ratio", "oe_neighbor_num", "oe_split_num", "moe_topk", "expert_ffn_hidden_size",
                "num_layers", "rope_scaling", "rope_theta"):
        base.pop(key)
    base.update(
        ngram_vocab_size_ratio=3.5, emb_neighbor_num=3, emb_split_num=4,
        num_experts_per_tok=2, moe_intermediate_size=48, num_hidden_layers=6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
                         "original_max_position_embeddings": 128, "beta_fast": 16.0, "beta_slow": 2.0,
                         "mscale": 1.0, "mscale_all_dim": 0.5},
    )
    cfg = from_hf_config(base)
    assert (cfg.oe_vocab_size_ratio, cfg.oe_neighbor_num, cfg.oe_split_num) == (3.5, 3, 4)
    assert (cfg.moe_topk, cfg.expert_ffn_hidden_size, cfg.num_layers) == (2, 48, 3)  # 6 sublayers = 3 layers
    assert (cfg.rope_theta, cfg.yarn_factor, cfg.yarn_original_max_position_embeddings) == (5e5, 8.0, 128)
    assert (cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.yarn_mscale_all_dim) == (16.0, 2.0, 0.5)


@pytest.mark.parametrize(
    "change, name",
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
        ({"hidden_size": "wide"}, "hidden_size"),
    ],
)
def test_hf_config_errors(change, name):
    with pytest.raises(ConfigError, match=name):
        from_hf_config({**to_hf_config(preset("small")), **change})


def test_transformers_config_builds_from_ours():
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny", yarn_mscale_all_dim=0.707, yarn_beta_fast=16.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.LongcatFlashConfig(**to_hf_config(cfg))
    assert hf.head_dim == cfg.qk_rope_head_dim == 8
    assert hf.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert (hf.num_layers, hf.num_hidden_layers) == (cfg.num_layers, 2 * cfg.num_layers)
    rope = hf.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 256
    assert (rope["beta_fast"], rope["beta_slow"], rope["mscale"], rope["mscale_all_dim"]) == (16.0, 1.0, 1.0, 0.707)
    assert rope["rope_theta"] == cfg.rope_theta
    assert (hf.n_routed_experts, hf.zero_expert_num, hf.moe_topk) == (8, 4, 3)
    # and back: what transformers writes reads as the same config
    again = from_hf_config(hf.to_dict())
    assert again == cfg, _diff(cfg, again)
