from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from onn_jax import config
from onn_jax.config import ConfigError


def test_default_yaml_loads_and_round_trips(tmp_path):
  cfg = config.load("configs/default.yaml")
  config.save(cfg, tmp_path / "c.yaml")
  assert config.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", ["default", "arc1", "arc2"])
def test_shipped_configs_are_valid(name):
  config.load(f"configs/{name}.yaml")


def test_overrides_are_typed():
  cfg = config.load("configs/default.yaml", ["train.seed=3", "data.buckets=[64, 128]",
                                              "eavi.feed=argmax", "train.learning_rate=1e-3"])
  assert cfg.train.seed == 3
  assert cfg.data.buckets == (64, 128)
  assert cfg.eavi.feed == "argmax"
  assert cfg.train.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize("override, culprit", [
    ("train.pretrain_steps=-1", "train.pretrain_steps"),
    ("train.nosuchkey=1", "train.nosuchkey"),
    ("nosection.key=1", "nosection"),
    ("train.seed=abc", "train.seed"),
    ("train.seed=1.5", "train.seed"),
    ("model.window=0", "model.window"),
    ("model.select_len=6", "model.select_len"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.num_select=2", "model.num_select"),
    ("eavi.feed=beam", "eavi.feed"),
    ("model.moe_impl=sparse", "model.moe_impl"),
    ("data.pack_misses=-1", "data.pack_misses"),
    ("data.pack_misses=.inf", "data.pack_misses"),
    ("data.max_batch_tokens=-1", "data.max_batch_tokens"),
    ("train.ema_decay=0.99999999", "train.ema_decay"),  # 1 in float32
    ("model.moe_capacity=0", "model.moe_capacity"),
    ("model.moe_capacity=-1.5", "model.moe_capacity"),
    ("model.moe_capacity=.nan", "model.moe_capacity"),
    ("model.moe_capacity=.inf", "model.moe_capacity"),
    ("model.moe_tile=0", "model.moe_tile"),
    ("data.buckets=[256, 128]", "data.buckets"),
    ("eval.max_len=-1", "eval.max_len"),
    ("eval.max_batch_tokens=-8", "eval.max_batch_tokens"),
    ("eval.max_batch_tokens=1.5", "eval.max_batch_tokens"),
    ("train.seed", "train.seed"),
    ("train.eavi_every=-1", "train.eavi_every"),
    ("train.eavi_every=1", "train.eavi_every"),
    ("eavi.answer_groups=[128,64]", "eavi.answer_groups"),
    ("eavi.budget_quantile=0", "eavi.budget_quantile"),
    ("eavi.budget_quantile=1.5", "eavi.budget_quantile"),
    ("eavi.answer_groups=[0,64]", "eavi.answer_groups"),
])
def test_bad_values_name_the_key(override, culprit):
  with pytest.raises(ConfigError) as err:
    config.load("configs/default.yaml", [override])
  message = str(err.value)
  assert culprit in message and "\n" not in message


def test_pack_len_must_be_a_bucket_only_when_packing():
  with pytest.raises(ConfigError, match=r"^data\.pack_len: .*data\.pack is on, got 100$"):
    config.load("configs/default.yaml", ["data.pack=true", "data.pack_len=100"])
  assert config.load("configs/default.yaml", ["data.pack_len=100"]).data.pack_len == 100
  # The shipped GPU configs pack at 2048: one shorter bucket, unpacked, still loads.
  arc1 = config.load("arc1", ["data.buckets=[1024]", "data.pack=false"])
  assert arc1.data.buckets == (1024,) and arc1.data.pack_len == 2048


def test_eavi_every_of_one_says_there_would_be_no_teacher_forcing():
  with pytest.raises(ConfigError, match=r"^train\.eavi_every: 1 .*no teacher forcing.*"
                     r"train\.pretrain_steps=0"):
    config.load("configs/default.yaml", ["train.eavi_every=1"])
  assert config.load("configs/default.yaml", ["train.eavi_every=2"]).train.eavi_every == 2


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    config.load(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="bad.yaml"):
    config.load(bad)


@pytest.mark.parametrize("override", ["train.pretrain_steps=-1", "train.bogus=1"])
def test_main_rejects_bad_overrides_with_one_line(override, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "train.main", "--workdir", str(tmp_path / "w"),
                         override], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and override.split("=")[0] in lines[0]
  assert not (tmp_path / "w").exists()  # rejected before any work


def test_the_keys_type_decides_where_yaml_would_guess(tmp_path):
  """Overrides are read as YAML 1.1, whose guesses a key's type corrects: a string key takes
  the text as typed, an integer key reads base 10; a value YAML cannot read says to quote it."""
  cfg = config.load(None, ["data.train=1", "train.seed=010", "train.learning_rate=1e-3",
                           "train.init_from=off"])
  assert (cfg.data.train, cfg.train.seed, cfg.train.learning_rate) == ("1", 10, 1e-3)
  assert cfg.train.init_from == "off"
  with pytest.raises(ConfigError, match=r"^data\.color_perm: 'no' is not one of"):
    config.load(None, ["data.color_perm=no"])
  with pytest.raises(ConfigError, match=r"^ttt\.params: cannot read value '\[\*\]' .*quote the "
                                        r"whole override"):
    config.load(None, ["ttt.params=[*]"])
  assert config.load(None, ['ttt.params=["*"]']).ttt.params == ("*",)
  # In a YAML file the text is YAML's: a boolean where a string belongs says why.
  path = tmp_path / "mine.yaml"
  path.write_text("data:\n  color_perm: off\n")
  with pytest.raises(ConfigError, match=r"expected a string, got False \(YAML reads yes/no"):
    config.load(path)
  # A section whose keys are all commented out is the defaults; a bad file says where.
  path.write_text("train:\n  # seed: 3\n")
  assert config.load(path).train == config.TrainConfig()
  assert config.load(path, ["train.seed=3"]).train.seed == 3  # (refused before)
  path.write_text("train:\n  seed: 1\n bad: [\n")
  with pytest.raises(ConfigError, match=r"mine.yaml: not valid YAML at line 3, column 2"):
    config.load(path)
  # Text YAML would read as a date, a comment, an anchor or a sexagesimal number.
  cfg = config.load(None, ["train.init_from=2024-12-01", "data.eval=#held_out", "data.train=&x",
                           "ttt.params=[\"*\"]"])
  assert (cfg.train.init_from, cfg.data.eval, cfg.data.train) == ("2024-12-01", "#held_out", "&x")
  assert config.load(None, ["data.eval=null"]).data.eval == ""  # null and empty: none
  for text in ("@x", "%x", "*x", "`x"):  # text YAML cannot read at all
    assert config.load(None, [f"train.init_from={text}"]).train.init_from == text
  assert config.load(None, ["data.eval='a b'"]).data.eval == "a b"  # quoted: YAML's
  for override in ("train.pretrain_steps=1:30", "train.learning_rate=1:30"):
    with pytest.raises(ConfigError, match=r"expected a number, got '1:30'$"):
      config.load(None, [override])


def test_a_config_file_that_repeats_a_key_or_cannot_be_read_is_one_line(tmp_path):
  """A section or key given twice in a YAML file is an error (a ``train:`` block appended to
  a copy of a shipped config replaced its whole section, silently); a file that is not UTF-8
  text is one line (a traceback before)."""
  path = tmp_path / "mine.yaml"
  path.write_text(config.resolve("default").read_text() + "train:\n  seed: 7\n")
  line = len(config.resolve("default").read_text().splitlines()) + 1
  with pytest.raises(ConfigError, match=rf"mine.yaml: not valid YAML at line {line}, column 1 "
                     r"\(key 'train' given twice in one mapping\)$"):
    config.load(path)
  path.write_text("train:\n  seed: 1\n  seed: 2\n")
  with pytest.raises(ConfigError, match=r"line 3, column 3 \(key 'seed' given twice"):
    config.load(path)
  path.write_text("base: &b\n  seed: 4\ntrain:\n  <<: *b\n")  # a merge key is not a repeat
  with pytest.raises(ConfigError, match=r"^base: unknown key"):
    config.load(path)  # (refused for its extra section, as before: not as YAML)
  path.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ConfigError, match=r"mine.yaml: cannot be read \(not UTF-8 text"):
    config.load(path)


def test_overrides_may_stand_before_and_after_the_options():
  from train import main as train_main
  args = train_main.parse_args(["train.seed=3", "--workdir", "w", "train.pretrain_steps=5",
                                "--config", "arc1"])
  assert args.overrides == ["train.seed=3", "train.pretrain_steps=5"]
  assert (args.workdir, args.config) == ("w", "arc1")


def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
  """After a plain pip install there is no configs/ folder: names and configs/NAME.yaml still
  reach the YAML shipped inside the package (the clone's configs/ links to the same files)."""
  assert config.shipped_names() == ["arc1", "arc2", "default"]
  in_clone = config.load("configs/arc1.yaml")
  monkeypatch.chdir(tmp_path)
  assert config.load("arc1") == config.load("configs/arc1.yaml") == in_clone
  assert config.resolve("configs/default.yaml") == config.SHIPPED_DIR / "default.yaml"
  (tmp_path / "mine.yaml").write_text("train:\n  seed: 5\n")
  assert config.load("mine.yaml").train.seed == 5  # a path still wins
  with pytest.raises(ConfigError, match=r"^elsewhere/arc1\.yaml: config file not found"):
    config.load("elsewhere/arc1.yaml")  # only configs/NAME.yaml falls back to the package
  mine = tmp_path / "project" / "configs" / "default.yaml"
  with pytest.raises(ConfigError, match=r"project/configs/default\.yaml: config file not found"):
    config.load(mine)  # one's own configs/ folder, not the clone's: no fallback


def test_print_config_prints_the_resolved_yaml_and_exits(capsys):
  from train import main
  assert main.main(["--config", "arc2", "--print-config", "train.seed=9"]) == 0
  printed = capsys.readouterr().out
  assert config.from_dict(config.yaml.safe_load(printed)) == config.load("arc2", ["train.seed=9"])
  with pytest.raises(SystemExit):
    main.main(["--help"])
  assert "onn_jax/config.py" in capsys.readouterr().out


def test_a_saved_run_without_a_newer_key_reloads_as_it_was_trained(tmp_path):
  """A run saved before model.cmp_rope existed trained the rotated-query model: its
  config.yaml reloads as that model, a user's YAML gets today's default, and a saved key wins."""
  cfg = config.load("configs/default.yaml")
  values = config.to_dict(cfg)
  del values["model"]["cmp_rope"]
  del values["train"]["eavi_every"]  # today's default (0) is how every older run trained
  (tmp_path / "old.yaml").write_text(yaml.safe_dump(values))
  assert config.load(tmp_path / "old.yaml", saved_run=True).model.cmp_rope == "query"
  assert config.load(tmp_path / "old.yaml", saved_run=True).train.eavi_every == 0
  assert config.load(tmp_path / "old.yaml").model.cmp_rope == "none"
  config.save(cfg, tmp_path / "new.yaml")
  assert config.load(tmp_path / "new.yaml", saved_run=True).model.cmp_rope == "none"
