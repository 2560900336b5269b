"""Bad-input matrix: data, settings and model, through every entry point.

Each bad input must end with exit code 2, a message naming the file, key or flag and
how to fix it, no process started and the institution's ledger / the run's output
folder unchanged byte for byte. Certificates and keys: ``test_bad_input_certs.py``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from support import Started, closed_port, snapshot
from transformers import ViTConfig

from fedsilo.client import cli as client_cli
from fedsilo.client.ledger import Ledger
from fedsilo.common.config import ConfigError, FedsiloConfig, ModelConfig
from fedsilo.common.model import ModelError, load_model, load_tokenizer
from fedsilo.common.records import MAX_FIELD_CHARS, DataError, LabelMap, load_records
from fedsilo.server import cli as server_cli
from fedsilo.server.provision import provision

ROOT = Path(__file__).resolve().parents[1]
LABELS = '["cardio", "resp"]'
HUGE = 100 * 1024 * 1024  # a 100 MB line



def rows(labels: tuple[str, ...] = ("cardio", "resp")) -> str:
    """A small CSV with 10 rows per label."""
    body = "".join(f"note {i} about {lab},{lab}\n" for lab in labels for i in range(10))
    return "text,label\n" + body


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    """A provisioned institution kit with good data and a ledger holding one round."""
    folder = provision(tmp_path / "pki", ["localhost"], ["hospital-a"],
                       generate_keys=True).kits["hospital-a"]
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text(rows(), "utf-8")
    Ledger.open(folder / "ledger", "e" * 64, "rdp").record(3, 1, 40, 0.05, 1.0, 1e-5)
    return folder


@pytest.fixture
def run_client(kit: Path, tiny_bert: Path) -> Callable[..., int]:
    """``flower-client --check`` on the kit; asserts the ledger is unchanged."""
    def run(*args: str, insecure: bool = True) -> int:
        before = snapshot(kit / "ledger")
        argv = ["--config", str(kit / "client.toml"), "--check", "--model", str(tiny_bert),
                "--labels", LABELS, "--superlink", f"127.0.0.1:{closed_port()}", *args]
        code = client_cli.main([*argv, "--insecure"] if insecure else argv)
        after = snapshot(kit / "ledger")
        if code == 0:  # a passing check journals its de-identification counts (and caches)
            after = {k: v for k, v in after.items() if k in before
                     or not (k == "journal.jsonl" or k.startswith("token-cache/"))}
        assert after == before
        return code
    return run


@pytest.fixture(scope="module")
def sim_module() -> ModuleType:
    """``simulations/run_simulation.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(
        "run_simulation_bad_input", ROOT / "simulations" / "run_simulation.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never_start(*args: object, **kwargs: object) -> None:
    raise Started


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An earlier run's output folder that a refused command must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"rounds": []}\n', "utf-8")
    return out


@pytest.fixture
def run_sim(sim_module: ModuleType, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path,
            tmp_path: Path, out_dir: Path) -> Callable[..., int]:
    """The simulation's ``main`` in-process; a SuperLink start raises :class:`Started`."""
    monkeypatch.setattr(sim_module, "SuperLink", _never_start)
    monkeypatch.setattr(sim_module, "terminate_on_sigterm", lambda: None)
    data = tmp_path / "good.csv"
    data.write_text(rows(), "utf-8")

    def run(*args: str) -> int:
        before = snapshot(out_dir)
        argv = ["--institutions", "2", "--partition", "iid", "--model", str(tiny_bert),
                "--labels", LABELS, "--data", str(data), "--output-dir", str(out_dir), *args]
        try:
            return sim_module.main(argv)
        finally:
            assert snapshot(out_dir) == before
    return run


@pytest.fixture
def run_server(monkeypatch: pytest.MonkeyPatch, tiny_bert: Path, tmp_path: Path,
               out_dir: Path) -> Callable[..., int]:
    """``flower-server --insecure`` in-process; starting the run raises :class:`Started`."""
    monkeypatch.setattr(server_cli, "run", _never_start)
    monkeypatch.setattr(server_cli, "terminate_on_sigterm", lambda: None)

    def run(*args: str) -> int:
        before = snapshot(out_dir)
        argv = ["--insecure", "--model", str(tiny_bert), "--labels", LABELS, "--output-dir",
                str(out_dir), "--state-dir", str(tmp_path / "state"), *args]
        try:
            return server_cli.main(argv)
        finally:
            assert snapshot(out_dir) == before
            assert not (tmp_path / "state").exists()
    return run


# ------------------------------------------------------------------------------ data
DATA_CASES: dict[str, tuple[str | bytes | None, str]] = {
    "missing": (None, r"bad\.csv' does not exist or is not a file; check the path"),
    "empty": ("", r"bad\.csv' is empty \(no data rows\); add labelled rows"),
    "header only": ("text,label\n", r"bad\.csv' is empty"),
    "wrong columns": ("note,dx\nchest pain,cardio\n",
                      r"bad\.csv' has no column 'text' \(columns: note, dx\); set "
                      r"--text-column to one of them"),
    "unknown labels": (rows(("cardio", "derm")),
                       r"bad\.csv' has labels outside the federation's label map: 'derm' "
                       r"\(\d+ rows\).*must include them"),
    "non-utf8": (b"text,label\nna\xefve,cardio\n",
                 r"bad\.csv' is not valid UTF-8 \(bad byte at offset 13\); re-save it"),
    "empty text": ("text,label\n ,cardio\n", r"bad\.csv' line 2: column 'text' has no text"),
}


def _write(path: Path, content: str | bytes | None) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, "utf-8")
    return path


@pytest.mark.parametrize("case", DATA_CASES)
def test_client_check_refuses_bad_data(case: str, kit: Path, run_client: Callable[..., int],
                                       logs: pytest.LogCaptureFixture) -> None:
    content, message = DATA_CASES[case]
    path = _write(kit / "data" / "bad.csv", content)
    assert run_client("--data", str(path)) == 2
    assert logs.records[-1].levelname == "ERROR"
    assert re.search(message, logs.text)


@pytest.mark.parametrize("case", DATA_CASES)
def test_simulation_refuses_bad_data_before_starting(
        case: str, tmp_path: Path, run_sim: Callable[..., int],
        logs: pytest.LogCaptureFixture) -> None:
    content, message = DATA_CASES[case]
    path = _write(tmp_path / "bad.csv", content)
    assert run_sim("--data", str(path)) == 2
    assert re.search(message, logs.text)


def test_good_input_passes_every_check(run_client: Callable[..., int],
                                       run_sim: Callable[..., int],
                                       run_server: Callable[..., int]) -> None:
    """The baseline: the same fixtures with good input get past validation."""
    assert run_client() == 0
    with pytest.raises(Started):
        run_sim()
    with pytest.raises(Started):
        run_server()


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CSV and a JSON Lines file whose second / first line is a 100 MB text."""
    folder = tmp_path_factory.mktemp("huge")
    chunk = "x" * (1024 * 1024)
    paths = {"csv": folder / "huge.csv", "jsonl": folder / "huge.jsonl"}
    with paths["csv"].open("w", encoding="utf-8") as fh:
        fh.write("text,label\nshort,cardio\n")
        fh.writelines(chunk for _ in range(HUGE // len(chunk)))
        fh.write(",resp\n")
    with paths["jsonl"].open("w", encoding="utf-8") as fh:
        fh.write('{"label": "cardio", "text": "')
        fh.writelines(chunk for _ in range(HUGE // len(chunk)))
        fh.write('"}\n')
    return paths


@pytest.mark.parametrize(("kind", "where"), [("csv", "line 3"), ("jsonl", "line 1")])
def test_a_100_mb_line_is_refused_naming_file_and_line(
        huge: dict[str, Path], kind: str, where: str) -> None:
    with pytest.raises(DataError) as err:
        load_records(str(huge[kind]))
    message = str(err.value)
    assert f"'{huge[kind]}' {where}" in message
    assert f"over the limit of {MAX_FIELD_CHARS:,}" in message and "shorten" in message


def test_client_and_simulation_refuse_the_100_mb_line(
        huge: dict[str, Path], run_client: Callable[..., int], run_sim: Callable[..., int],
        logs: pytest.LogCaptureFixture) -> None:
    assert run_client("--data", str(huge["jsonl"])) == 2
    assert f"'{huge['jsonl']}' line 1: a value is" in logs.text
    logs.clear()
    assert run_sim("--data", str(huge["csv"])) == 2
    assert f"'{huge['csv']}' line 3: a value is over" in logs.text


def test_field_limit_applies_per_column_in_every_format(tmp_path: Path) -> None:
    long_ok = "y" * 200_000  # over the csv module's default limit, within fedsilo's
    path = _write(tmp_path / "ok.csv", f"text,label\n{long_ok},a\n")
    assert load_records(str(path)).texts == [long_ok]
    too_long = "z" * (MAX_FIELD_CHARS + 1)
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "b"}\n'
                  + json.dumps({"text": too_long, "label": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl' line 2, column 'text': a value is "
                       r"1,000,001 characters long"):
        load_records(str(path))
    path = _write(tmp_path / "l.jsonl", json.dumps({"text": "a", "label": too_long}) + "\n")
    with pytest.raises(DataError, match=r"l\.jsonl' line 1, column 'label'"):
        load_records(str(path))


# ---------------------------------------------------------------------------- config
TOML_CASES: dict[str, tuple[str, str, str]] = {
    # case: (line in the kit's client.toml, its replacement, expected message)
    "unknown key": ("target-epsilon = 8.0", "target-epsilon = 8.0\nepsilon = 3",
                    r"client\.toml: unknown key\(s\) \['epsilon'\]; known keys: "),
    "wrong type": ("target-epsilon = 8.0", 'target-epsilon = "eight"',
                   r"client\.toml: 'target-epsilon' must be a number \(got 'eight' of type "
                   r"str\); fix it in client\.toml"),
    "wrong type bool": ("target-epsilon = 8.0", 'target-epsilon = 8.0\ninsecure = "no"',
                        r"client\.toml: 'insecure' must be true or false"),
    "negative epsilon": ("target-epsilon = 8.0", "target-epsilon = -1.0",
                         r"client\.toml: invalid 'target-epsilon' \(--target-epsilon\): "
                         r"Input should be greater than 0"),
    "delta >= 1": ("target-delta = 0.0", "target-delta = 1.0",
                   r"client\.toml: invalid 'target-delta' \(--target-delta\): Input should "
                   r"be less than 1"),
    "not toml": ("target-epsilon = 8.0", "target-epsilon = ",
                 r"client\.toml: cannot read the client config"),
    "superlink without port": ('superlink = "localhost:9092"', 'superlink = "localhost"',
                               r"superlink 'localhost' is not HOST:PORT"),
}


@pytest.mark.parametrize("case", TOML_CASES)
def test_client_toml_errors_name_file_and_key(case: str, kit: Path, tiny_bert: Path,
                                              logs: pytest.LogCaptureFixture) -> None:
    old, new, message = TOML_CASES[case]
    toml = kit / "client.toml"
    text = toml.read_text("utf-8")
    assert old in text
    toml.write_text(text.replace(old, new), "utf-8")
    before = snapshot(kit)
    argv = ["--config", str(toml), "--check", "--model", str(tiny_bert), "--labels", LABELS,
            "--data", str(kit / "data" / "train.csv"), "--insecure"]
    assert client_cli.main(argv) == 2
    assert snapshot(kit) == before
    assert re.search(message, logs.text)


FLAG_CASES: dict[str, tuple[list[str], str]] = {
    "negative epsilon": (["--target-epsilon", "-1"],
                         r"invalid 'target-epsilon' \(--target-epsilon\): Input should be "
                         r"greater than 0"),
    "delta >= 1": (["--target-delta", "1"],
                   r"invalid 'target-delta' \(--target-delta\): Input should be less than 1"),
}
USAGE_CASES: dict[str, tuple[list[str], str]] = {
    "unknown flag": (["--epsilon", "3"], "unrecognized arguments: --epsilon 3"),
    "wrong type": (["--target-epsilon", "eight"],
                   "argument --target-epsilon: invalid float value: 'eight'"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
@pytest.mark.parametrize("entry", ["client", "server", "simulation"])
def test_bad_flag_values_name_the_flag(case: str, entry: str, logs: pytest.LogCaptureFixture,
                                       request: pytest.FixtureRequest) -> None:
    args, message = FLAG_CASES[case]
    assert request.getfixturevalue(f"run_{entry.replace('simulation', 'sim')}")(*args) == 2
    assert re.search(message, logs.text)


@pytest.mark.parametrize("case", USAGE_CASES)
@pytest.mark.parametrize("entry", ["client", "server", "simulation"])
def test_unknown_or_mistyped_flags_are_usage_errors(
        case: str, entry: str, capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest) -> None:
    args, message = USAGE_CASES[case]
    with pytest.raises(SystemExit) as exit_:
        request.getfixturevalue(f"run_{entry.replace('simulation', 'sim')}")(*args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flat", "message"), [
    ({"epsilon": 3.0}, r"run config: unknown setting 'epsilon'"),
    ({"target-epsilon": "eight"}, r"run config: invalid 'target-epsilon' .*valid number"),
    ({"num-rounds": 2.5}, r"run config: invalid 'num-rounds' .*valid integer"),
    ({"target-epsilon": -1.0}, r"run config: invalid 'target-epsilon' .*greater than 0"),
    ({"target-delta": 1.0}, r"run config: invalid 'target-delta' .*less than 1"),
])
def test_run_config_errors_name_the_key(flat: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedsiloConfig.from_flat(flat, origin="run config")


# ----------------------------------------------------------------------------- model
def _vit_folder(path: Path, tiny_bert: Path) -> None:
    """A checkpoint folder whose model type (ViT) cannot classify text."""
    shutil.copytree(tiny_bert, path)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64).save_pretrained(path)


def _garbage_folder(path: Path, tiny_bert: Path) -> None:
    shutil.copytree(tiny_bert, path)
    (path / "config.json").write_text("{not json", "utf-8")


MODEL_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "missing folder": (lambda p, t: None, r"bad-model': no such folder"),
    "empty folder": (lambda p, t: p.mkdir(), r"bad-model': folder has no config\.json"),
    "garbage config": (_garbage_folder, r"bad-model': cannot load this folder"),
    "not a text classifier": (_vit_folder, r"bad-model': model type 'vit' cannot classify"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("entry", ["client", "server", "simulation"])
def test_bad_model_folder_is_refused_naming_it(
        case: str, entry: str, tmp_path: Path, tiny_bert: Path,
        logs: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
    make, message = MODEL_CASES[case]
    folder = tmp_path / "bad-model"
    make(folder, tiny_bert)
    run = request.getfixturevalue(f"run_{entry.replace('simulation', 'sim')}")
    assert run("--model", str(folder)) == 2
    assert re.search(message, logs.text)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_loaders_raise_model_error(case: str, tmp_path: Path, tiny_bert: Path) -> None:
    make, message = MODEL_CASES[case]
    make(tmp_path / "bad-model", tiny_bert)
    cfg = ModelConfig(model=str(tmp_path / "bad-model"))
    with pytest.raises(ModelError, match=message):
        load_tokenizer(cfg)
    with pytest.raises(ModelError, match=message):
        load_model(cfg, LabelMap.from_names(["a", "b"]), seed=0)


def test_head_with_other_label_count_is_replaced_and_says_so(
        tiny_bert: Path, logs: pytest.LogCaptureFixture) -> None:
    """tiny_bert has a 2-label head; a 3-label federation gets a new head, logged."""
    cfg = ModelConfig(model=str(tiny_bert))
    model = load_model(cfg, LabelMap.from_names(["a", "b", "c"]), seed=7)
    assert model.classifier.out_features == 3
    warning = [r for r in logs.records if r.levelname == "WARNING"]
    assert len(warning) == 1
    text = warning[0].getMessage()
    assert str(tiny_bert) in text and "2 labels" in text and "has 3" in text
    assert "replaced" in text and "seed 7" in text
    logs.clear()
    load_model(cfg, LabelMap.from_names(["a", "b"]), seed=7)
    assert not [r for r in logs.records if r.levelname == "WARNING"]


def test_demo_momentum_default_gives_way_to_settings_that_need_plain_fedavg(
        sim_module: ModuleType) -> None:
    def strategy(*argv: str) -> str:
        args = sim_module.build_parser().parse_args(list(argv))
        return sim_module.resolve_config(args).federation.strategy

    assert strategy() == "fedavgm"  # the demo's default
    assert strategy("--secure-aggregation") == "fedavg"
    assert strategy("--dp-level", "client") == "fedavg"
    assert strategy("--no-dp", "--dp-level", "client") == "fedavgm"  # no client-level DP
    with pytest.raises(ConfigError, match="--strategy fedavg only"):  # asked for: refused, named
        strategy("--secure-aggregation", "--strategy", "fedavgm")
