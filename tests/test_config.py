"""Config presets, overrides from YAML and key=value, validation with clear messages."""
import pytest

from redheart.config import Config, ConfigError, build_config, parse_assignment, preset, set_value


def test_overrides_from_yaml_then_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.0003\n  epochs: 7\ntech:\n  rdrop_alpha: 0\n")
    cfg = build_config("tiny", [str(y)], ["train.epochs=9", "train.head_weights.surd=2"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 9 and cfg.tech.rdrop_alpha == 0.0
    assert cfg.train.head_weights == {"emotion": 1.0, "bentham": 1.0, "regret": 1.0, "surd": 2.0}


def test_bare_on_and_off_read_as_the_words_the_readme_uses(tmp_path):
    """YAML 1.1 reads `on`/`off` as booleans; the on/off switches still take them as written."""
    cfg = build_config("tiny", [], ["memory.swap=on", "train.cuda_graphs=off", "train.bf16_weights=on"])
    assert (cfg.memory.swap, cfg.train.cuda_graphs, cfg.train.bf16_weights) == ("on", "off", "on")
    y = tmp_path / "c.yaml"
    y.write_text("memory:\n  swap: off\n")
    assert build_config("tiny", [str(y)], []).memory.swap == "off"
    with pytest.raises(ConfigError, match="train.snapshot_weights"):  # not a switch: still an error
        build_config("tiny", [], ["train.snapshot_weights=on"])


@pytest.mark.parametrize("source", ["set", "yaml"])
@pytest.mark.parametrize("value", ["inf", ".inf", "1e999", "-.inf", ".nan", "nan", "1e999999"])
def test_an_integer_setting_given_infinity_or_nan_is_a_config_error(tmp_path, source, value):
    """(issue 27: `validate --set train.epochs=inf` or `epochs: .inf` in a --config file ended in
    an internal OverflowError, found by the command-line property test)"""
    y = tmp_path / "c.yaml"
    y.write_text(f"train:\n  epochs: {value}\n")
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got "):
        build_config("tiny", [str(y)] if source == "yaml" else [], [f"train.epochs={value}"] if source == "set" else [])


def test_a_large_integer_is_kept_exactly_and_a_seed_must_be_in_range():
    assert build_config("tiny", [], ["train.epochs=12345678901234567891"]).train.epochs == 12345678901234567891
    for seed in ("-1", str(2**32), "99999999999999999999999"):  # torch cannot take the last one
        with pytest.raises(ConfigError, match=r"train\.seed: must be in \[0, 2\*\*32\)"):
            build_config("tiny", [], [f"train.seed={seed}"])
    assert build_config("tiny", [], [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_round_trip_through_a_dict():
    cfg = build_config("730m", [], ["train.lr=2e-4", "data.paths=[a.jsonl, b.tsv]"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.data.paths == ["a.jsonl", "b.tsv"]


@pytest.mark.parametrize("assignment, field", [
    ("train.lr=-1", "train.lr"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("model.heads=7", "model.heads"),
    ("tech.ema_decay=1.5", "tech.ema_decay"),
    ("train.precision=fp8", "train.precision"),
    ("train.epochs=two", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("data.train_frac=0.95", "data.val_frac"),
    ("train.nonsense=1", "train.nonsense"),
    ("train.bf16_weights=maybe", "train.bf16_weights"),
    ("train.parallel=zero3", "train.parallel"),
    ("train.packed_attention=sideways", "train.packed_attention"),
    ("train.compile_wrapper=java", "train.compile_wrapper"),
])
def test_invalid_values_fail_at_load_naming_the_field(assignment, field):
    with pytest.raises(ConfigError) as err:
        build_config("tiny", [], [assignment])
    assert field in str(err.value)


@pytest.mark.parametrize("assignment, field", [
    ("train.compile=true", "train.compile"),
    ("train.cuda_graphs=on", "train.cuda_graphs"),
    ("memory.swap=on", "memory.swap"),
    ("train.bf16_weights=on", "train.bf16_weights"),
    ("tech.ema_device=cpu", "tech.ema_device"),
])
def test_fsdp_refuses_what_it_cannot_run_naming_the_setting(assignment, field):
    with pytest.raises(ConfigError) as err:
        build_config("tiny", [], ["train.parallel=fsdp", assignment])
    assert field in str(err.value) and "train.parallel=fsdp" in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as err:
        build_config("tiny", [str(y)], [])
    assert "bad.yaml" in str(err.value) and "line" in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        build_config("tiny", [str(tmp_path / "missing.yaml")], [])


def test_unknown_preset_and_bad_assignment():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("1b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("train.lr")
    cfg = preset("tiny")
    with pytest.raises(ConfigError, match="expected true or false"):
        set_value(cfg, "train.compile", "maybe")


def test_guide_defaults_of_the_730m_preset():
    cfg = preset("730m")
    assert (cfg.train.micro_batch, cfg.train.grad_accum, cfg.effective_batch) == (2, 32, 64)
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 60 and cfg.train.keep_checkpoints == 30
    assert (cfg.sweep.lr_min, cfg.sweep.lr_max, cfg.sweep.points) == (1e-5, 1e-2, 5)
    assert (cfg.tech.label_smoothing, cfg.tech.rdrop_alpha, cfg.tech.ema_decay) == (0.1, 1.0, 0.999)
