"""Config loading: YAML + dotted overrides, and one-line errors naming the file and key."""

import pytest

from t2v.config import DemoConfig, PackConfig, SynthConfig
from t2v.configfile import ConfigError, load_config, to_yaml


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, "out: /data/x\nnum: 10\nexclude: [red circle left]\n")
    cfg = load_config(SynthConfig, path, ["num=12", "frames=17", "only=[blue square up]"])
    assert (cfg.out, cfg.num, cfg.frames) == ("/data/x", 12, 17)
    assert cfg.exclude == ["red circle left"] and cfg.only == ["blue square up"]


def test_nested_override_and_round_trip(tmp_path):
    cfg = load_config(DemoConfig, None, ["synth.num=5", "dit.steps=3", "out=s3://b/demo"])
    assert cfg.synth.num == 5 and cfg.dit.steps == 3 and cfg.out == "s3://b/demo"
    again = load_config(DemoConfig, write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def one_line(err: ConfigError) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "synth:\n  nmu: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, path)
    msg = one_line(e.value)
    assert path in msg and "synth.nmu" in msg and "unknown key" in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"render\.bogus: unknown key"):
        load_config(DemoConfig, None, ["render.bogus=1"])


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "num: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(SynthConfig, path)
    msg = one_line(e.value)
    assert path in msg and "num" in msg and "'lots'" in msg


def test_out_of_range_value():
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(SynthConfig, None, ["shard_size=0"])
    with pytest.raises(ConfigError, match="size"):
        load_config(PackConfig, None, ["size=[64]"])


def test_num_workers_fixed_or_elastic_range(tmp_path):
    from t2v.config import TrainConfig

    assert load_config(TrainConfig, None, ["num_workers=4"]).min_workers == 4
    cfg = load_config(TrainConfig, write(tmp_path, "num_workers: [2, 8]\n"), [])
    assert cfg.num_workers == (2, 8) and cfg.min_workers == 2
    again = load_config(TrainConfig, write(tmp_path, to_yaml(cfg), "resolved.yaml"), [])
    assert again.num_workers == (2, 8)
    for bad in ("num_workers=[3,1]", "num_workers=0", "num_workers=[0,2]"):
        with pytest.raises(ConfigError, match="num_workers must be >= 1, or \\[MIN, MAX\\]"):
            load_config(TrainConfig, None, [bad])


@pytest.mark.parametrize("bad", ["num", "=3", "a..b=1", "two words=1", "num=[1,"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError) as e:
        load_config(SynthConfig, None, [bad])
    assert "override" in one_line(e.value)


def test_override_into_scalar_is_rejected():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(DemoConfig, None, ["out=/x", "out.deeper=1"])


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "num: 3\nout: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(SynthConfig, path)
    assert f"{path}:" in one_line(e.value) and "invalid YAML" in str(e.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(SynthConfig, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(SynthConfig, write(tmp_path, "- 1\n- 2\n"))


def test_config_from_s3(moto_s3, s3_bucket):
    from t2v import storage

    uri = storage.join(s3_bucket, "cfg/synth.yaml")
    storage.write_text(uri, "num: 7\n")
    assert load_config(SynthConfig, uri).num == 7
