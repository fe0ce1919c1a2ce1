"""Property-based tests: random config values and CLI arguments get a Config (or success), or one
clean error line; never a traceback. hypothesis generates the inputs and shrinks any failure to a
small example."""

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import yaml
from click.testing import CliRunner
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emofuse.cli import main
from emofuse.config import Config, load_config, save_config, to_dict
from emofuse.errors import UserError

# HYPO_N=1500 for a longer search (1500 examples each passed here in 95 s).
SETTINGS = settings(max_examples=int(os.environ.get("HYPO_N", 80)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in
          ((f.name, type(getattr(Config(), f.name))) for f in dataclasses.fields(Config))}
KEYS = [f"{s}.{k}" for s, ks in FIELDS.items() for k in ks]

odd_text = st.text(max_size=12) | st.sampled_from(
    ["", " ", "-1", "1e400", "nan", "inf", "${x}", "\\${x}", "???", "null", "[1", "{a: 1}", "a: b", "\u00e9", "\t", "\n",
     "audio", "text", "video", "minilm", "demo", "small"])
scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
           | odd_text)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
                      max_leaves=6)


def section_strategy(section: str):
    """A section's mapping: mostly its real keys (so values get checked, not only key names), some unknown."""
    keys = st.sampled_from(FIELDS[section]) | odd_text
    return st.dictionaries(keys, values, max_size=4)


configs = st.fixed_dictionaries({}, optional={s: section_strategy(s) | values for s in SECTIONS})
configs = configs | st.dictionaries(odd_text, values, max_size=2) | values


def check_outcome(load) -> Config | None:
    """load() returns a Config or raises UserError with one line; anything else fails the test."""
    try:
        cfg = load()
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return None
    assert isinstance(cfg, Config)
    return cfg


def roundtrips(cfg: Config) -> None:
    """A config that loads is saved with a run and must load back to the same values."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        again = load_config(path)
    a, b = to_dict(cfg), to_dict(again)
    assert _same(a, b), (a, b)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True  # NaN inside an encoder spec (free-form) survives the trip but is not == itself
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@SETTINGS
@given(document=configs)
@example(document="0")  # a scalar top level: AssertionError inside OmegaConf.load
@example(document=[1, 2])  # a list top level: TypeError from merge
@example(document={"extract": {"encoders": {"text": 5}}})  # TypeError at dict(spec) in extraction
@example(document={"extract": {"encoders": [1, 2]}})
@example(document={"train": {"batch_size": 0}})  # accepted, then a crash in make_batches
@example(document={"train": {"lr": float("nan")}})
@example(document={"train": {"seed": -1}})  # accepted, then numpy refused the seed
@example(document={"train": {"name": "a\\${x}"}})  # a literal "${": saved unescaped, the run's config did not reload
def test_random_config_files_load_or_fail_in_one_line(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
        cfg = check_outcome(lambda: load_config(path))
    if cfg is not None:
        roundtrips(cfg)


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200))
@example(text="a: [")  # YAML syntax errors were tracebacks
@example(text="\x08")  # PyYAML's ReaderError: a two-line message
@example(text=b"train: {name: caf\xe9}")  # not UTF-8
def test_random_bytes_as_a_config_file(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        check_outcome(lambda: load_config(path))


overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | odd_text,
                               odd_text | st.integers(-5, 5).map(str) | st.floats().map(str))
                     | odd_text, max_size=4)


@SETTINGS
@given(items=overrides)
@example(items=["[="])  # IndexError inside OmegaConf's key parser
@example(items=["train.epochs=[1"])  # a YAML error in the value
@example(items=["train.epochs=\x00"])
@example(items=["extract.shard_mb=-1"])
def test_random_overrides_load_or_fail_in_one_line(items):
    cfg = check_outcome(lambda: load_config("configs/demo.yaml", items))
    if cfg is not None:
        roundtrips(cfg)


# --- the CLI ---------------------------------------------------------------------------------------

# Commands whose successful runs are cheap here: the config's corpus root does not exist, and runs
# and caches are paths that hold nothing, so nothing is extracted or trained.
options = st.sampled_from(["--quiet", "--debug", "--json", "--folds", "--ablation", "--trust-checkpoint", "--help",
                           "--workers", "--device", "--seeds", "--text", "--transcript", "--audio", "-x", "--"])
arguments = st.lists(options | odd_text | st.integers(-3, 3).map(str) | overrides.map(lambda o: o[0] if o else "a=b"),
                     max_size=5)


@SETTINGS
@given(command=st.sampled_from([["extract", "CFG"], ["train", "CFG"], ["evaluate", "RUN"], ["predict", "RUN"],
                                ["cache", "info", "RUN"], ["cache", "verify", "RUN"], ["encoders", "CFG"], []]),
       extra=arguments)
def test_random_cli_arguments_exit_cleanly(command, extra):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(f"corpus: {{name: manifest, root: {tmp}/absent}}\n"
                       f"extract: {{cache: {tmp}/cache, encoders: {{text: {{backend: minilm}}}}}}\n"
                       f"train: {{runs: {tmp}/runs}}\n")
        args = [{"CFG": str(cfg), "RUN": f"{tmp}/run"}.get(a, a) for a in command] + extra
        if "--debug" in args:
            args.remove("--debug")  # --debug asks for tracebacks on purpose
        result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    if result.exit_code == 2 and "error: " in result.output:
        assert result.output.count("\n") == 1, (args, result.output)  # our errors: one line


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "bad config: train.batch_size must be a finite number >= 1, got 0"),
    ("train.modality_dropout=1.0", "bad config: train.modality_dropout must be a finite number in [0, 1), got 1.0"),
    ("extract.shard_mb=0", "bad config: extract.shard_mb must be a finite number > 0, got 0.0"),
    ("model.modalities=[audio,audio]", "bad config: model.modalities must be a non-empty list of distinct modalities"),
    ("extract.encoders.speech={backend: hf}", "bad config: extract.encoders must be keyed by modality (audio, text, video), got 'speech'"),
])
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(UserError) as e:
        load_config("configs/demo.yaml", [override])
    assert str(e.value).startswith(message), str(e.value)
