import pytest
import yaml

from vincie.config import Config, ConfigError, SynthConfig, load_config, to_yaml

from conftest import error_line, run_vincie


def test_preset_loads_and_matches_its_file():
    cfg = load_config("tiny")
    assert isinstance(cfg, Config)
    assert cfg.run.name == "tiny"
    assert cfg.synth.resolution == 64


def test_overrides_parse_typed_values():
    cfg = load_config("tiny", ["synth.resolution=32", "synth.pairs=true", "synth.noise_std=2",
                               "synth.transitions=[move, add]", "run.name=abc"])
    assert cfg.synth.resolution == 32 and cfg.synth.pairs is True
    assert cfg.synth.noise_std == 2.0 and isinstance(cfg.synth.noise_std, float)
    assert cfg.synth.transitions == ["move", "add"]
    assert cfg.run.name == "abc"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("tiny", ["synth.max_turns=4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, names", [
    ("synth.resolutoin=32", ["synth.resolutoin", "synth.resolution"]),
    ("sytnh.resolution=32", ["sytnh", "synth"]),
    ("synth.max_turns=many", ["synth.max_turns", "int", "str"]),
    ("synth.pairs=1", ["synth.pairs", "bool"]),
    ("synth.image_format=gif", ["synth.image_format", "'jpg'", "'png'"]),
    ("synth.transitions=[move, fly]", ["synth.transitions[1]", "'move'"]),
    ("synth.transitions=[undo]", ["synth.transitions", "besides undo"]),
    ("synth.min_turns=5", None),  # valid alone
    ("synth.max_turns=1", ["synth.max_turns", "min_turns"]),
    ("synth.resolution=30", ["synth.resolution", "multiple of 8"]),
    ("noequals", ["noequals", "section.key=value"]),
    ("data.turn_curriculum={100: 2}", ["data.turn_curriculum", "step 0"]),
    ("data.turn_curriculum={0: 9}", ["data.turn_curriculum", "1..data.max_turns"]),
    ("diffusion.prediction=noise", ["diffusion.prediction", "'x0'"]),
    ("data.buckets=['16x9']", ["data.buckets", "W:H", "'16x9'"]),
    ("data.buckets=['1:1', '2:2']", ["data.buckets", "distinct sizes"]),
    ("data.buckets=[]", ["data.buckets", "at least one"]),
    ("data.source_weights={a: -1}", ["data.source_weights", ">= 0"]),
    ("data.max_bad_share=2", ["data.max_bad_share", "[0, 1]"]),
    ("data.workers=-1", ["data.workers", ">= 0"]),
    ("storage.read_attempts=0", ["storage.read_attempts", ">= 1"]),
    ("train.min_lr_ratio=1.5", ["train.min_lr_ratio", "[0, 1]", "1.5"]),
    ("train.lr=0", ["train.lr", "> 0"]),
])
def test_bad_overrides_name_the_key(override, names):
    if names is None:
        load_config("tiny", [override, "synth.max_turns=6"])
        return
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\n   seed: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml at line 3"):
        load_config(str(path))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("tinyy")


def test_cli_config_errors_exit_nonzero_with_one_line(tmp_path):
    result = run_vincie("config", "show", "synth.resolutoin=32")
    assert result.returncode == 2 and result.stdout == ""
    assert "synth.resolution" in error_line(result)

    result = run_vincie("config", "show", "synth.max_turns=x")
    assert result.returncode == 2 and "synth.max_turns" in error_line(result)

    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    result = run_vincie("config", "show", "--config", str(bad))
    assert result.returncode == 2 and "bad.yaml" in error_line(result)

    bad.write_text("synth:\n  resolution: 64\n  shard_sise: 3\n")
    result = run_vincie("config", "show", "--config", str(bad))
    assert result.returncode == 2 and "synth.shard_size" in error_line(result)


def test_synth_stops_before_any_work_on_bad_config(tmp_path):
    out = tmp_path / "data"
    result = run_vincie("data", "synth", "--out", str(out), "--sessions", "4", "synth.max_objectz=3")
    assert result.returncode == 2 and "synth.max_objects" in error_line(result)
    assert not out.exists()


def test_launch_stops_before_torchrun_on_bad_config():
    result = run_vincie("launch", "local", "--nproc", "2", "--config", "tiny", "model.hidden_size=96")
    assert result.returncode == 2 and "model.text_dim" in error_line(result)  # once, not once per rank
    assert "launch:" not in result.stdout  # torchrun never started


def test_cli_show_prints_resolved_config():
    result = run_vincie("config", "show", "synth.resolution=32", check=True)
    assert yaml.safe_load(result.stdout)["synth"]["resolution"] == 32


def test_buckets_share_the_area_with_sides_on_the_latent_cell():
    from vincie.config import bucket_shapes

    cfg = load_config("tiny", ["data.buckets=['1:1', '16:9', '9:16']", "data.resolution=256", "model.patch_size=2"])
    assert bucket_shapes(cfg) == [(256, 256), (192, 344), (344, 192)]  # (H, W), multiples of 8 (VAE 4 x patch 2)
    assert all(abs(h * w / 256 ** 2 - 1) < 0.02 for h, w in bucket_shapes(cfg))


def test_dataclass_defaults_validate():
    from vincie.config import validate_synth

    validate_synth(SynthConfig())


def test_source_residual_needs_x0_prediction():
    load_config("tiny", ["model.source=residual"])  # the tiny preset predicts x0
    with pytest.raises(ConfigError, match=r"model\.source.*'residual'.*diffusion\.prediction=x0, got velocity"):
        load_config("tiny", ["model.source=residual", "diffusion.prediction=velocity"])
    with pytest.raises(ConfigError, match=r"model\.source.*'channels'"):
        load_config("tiny", ["model.source=concat"])


def test_exponent_floats_from_the_command_line():
    """YAML 1.1 reads 1e-5 (no dot) as a string; a float key takes it as the number it is, and nothing else."""
    assert load_config("tiny", ["model.norm_eps=1e-5", "train.lr=3E-4"]).model.norm_eps == 1e-5
    with pytest.raises(ConfigError, match="model.norm_eps' expects float, got str 'e-5'"):
        load_config("tiny", ["model.norm_eps=e-5"])
