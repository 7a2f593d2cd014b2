"""What a new user meets at the command line: start-up cost, help texts, key descriptions,
preset names, and config-file mistakes reported in one line."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gapt.cli import build_parser, main
from gapt.config import ConfigError, all_keys, key_help, load_config

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from gapt.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["keys"], ["train", "--help"], ["seg", "--help"],
                                  ["presets"]])
def test_help_version_and_keys_import_neither_torch_nor_timm(argv):
    # a fresh interpreter: this test process has torch loaded already
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("HEAVY=")]
    assert line == ["HEAVY="], proc.stderr[-2000:]


def test_commands_that_need_no_model_import_no_torch(tmp_path):
    # a sweep's dry run and a report read configs and JSON files only
    for argv in (["sweep", "--config", "fgvc/mae_vitb16/cub", "--dry-run", f"out={tmp_path / 'sw'}"],
                 ["report", str(tmp_path), "--out", str(tmp_path / "rep")]):
        proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert "HEAVY=\n" in proc.stderr + "\n", (argv, proc.stderr[-2000:])


def test_package_api_is_still_importable_lazily():
    import gapt
    from gapt import build_model, load_model  # noqa: F401 - resolved through the lazy __getattr__
    assert callable(gapt.build_model) and "build_model" in dir(gapt)
    with pytest.raises(AttributeError):
        gapt.no_such_name  # noqa: B018


def test_every_key_has_a_description(capsys):
    for key in all_keys():
        assert key_help(key), key
    assert main(["keys"]) == 0
    lines = {ln.split(" = ")[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(all_keys())
    assert "sigmoid(-gate_init)" in lines["gate_init"]
    for choice in ("mean", "cls", "img", "prompt"):  # pooling's choices, each explained
        assert choice in lines["pooling"]
    assert "#" in lines["data.cache"] and "memory" in lines["data.cache"]


def _subparsers(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + name, sub
                yield from _subparsers(sub, prefix + name + " ")


def test_named_options_have_help_texts():
    parser = build_parser()
    subs = dict(_subparsers(parser))
    for command, option in [("eval", "--split"), ("eval", "--json"), ("report", "--out"), ("predict", "--top-k"),
                            ("seg eval", "--split")]:
        action = next(a for a in subs[command]._actions if option in a.option_strings)
        assert action.help, f"gapt {command} {option}"


def test_every_config_named_in_help_resolves():
    texts = []
    for _, sub in _subparsers(build_parser()):
        texts.append(sub.format_help())
    # a config named after --config: a path or preset name (has a slash or ends in .yaml)
    names = {n for n in re.findall(r"--config\s+([\w./-]+)", "\n".join(texts)) if "/" in n or n.endswith(".yaml")}
    assert "fgvc/mae_vitb16/cub" in names
    for name in names:
        load_config(name)  # a packaged preset by name, from any folder


def test_presets_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("fgvc/mae_vitb16/cub")
    assert cfg.data.format == "fgvc" and cfg.data.name == "cub"
    assert load_config("vtab/mae_vitb16/dtd.yaml").data.name == "dtd"
    with pytest.raises(ConfigError, match="did you mean the preset 'fgvc/mae_vitb16/cub'"):
        load_config("fgvc/mae_vitb16/cubb")
    assert main(["presets"]) == 0
    assert "vtab/mocov3_vitb16/dtd" in capsys.readouterr().out.split()


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_config_file_must_be_a_mapping(tmp_path, capsys, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"config file {path} must be a mapping of keys" in err and kind in err
    assert "Traceback" not in err


def test_a_bare_config_file_suggests_config_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("sw.yaml").write_text("train:\n  lr: 0.5\n")
    assert main(["train", "sw.yaml"]) == 1
    assert "use --config sw.yaml" in capsys.readouterr().err
    assert main(["train", "fgvc/mae_vitb16/cub"]) == 1  # a preset name is a config too
    assert "use --config fgvc/mae_vitb16/cub" in capsys.readouterr().err
    assert main(["train", "lr"]) == 1  # no file, no preset: no such hint
    assert "--config" not in capsys.readouterr().err


def test_yaml_floats_are_read_as_omegaconf_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seg:\n  min_lr: 1e-5\n")
    assert load_config(str(path)).seg.min_lr == pytest.approx(1e-5)


@pytest.mark.parametrize("old,new", [("train.iterations", "seg.iterations"), ("train.eval_every", "seg.eval_every"),
                                     ("train.head_lr_mult", "seg.head_lr_mult"),
                                     ("train.poly_power", "seg.poly_power"), ("train.min_lr", "seg.min_lr"),
                                     ("crop_size", "seg.crop_size")])
def test_a_moved_key_says_where_it_went(tmp_path, capsys, old, new):
    assert new in all_keys() and old not in all_keys()
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{old}' (moved to '{new}')")):
        load_config(None, [f"{old}=1"])
    path = tmp_path / "old.yaml"
    section, _, leaf = old.rpartition(".")
    path.write_text(f"{section}:\n  {leaf}: 1\n" if section else f"{leaf}: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{old}' in {path} (moved to '{new}')")):
        load_config(str(path))
    assert main(["seg", "train", f"{old}=1"]) == 1
    assert f"(moved to '{new}')" in capsys.readouterr().err


def test_build_model_docstring_documents_every_parameter():
    import inspect

    from gapt.model.build import build_model
    doc = build_model.__doc__
    for name in inspect.signature(build_model).parameters:
        assert re.search(rf"^\s+{name}:", doc, re.M), name
    assert "-gate_init" in doc and "random_seed" in doc and "load_model(f, weights=None)" in doc


def test_the_train_help_example_is_a_valid_offline_run(capsys):
    import shlex

    from gapt.cli import TRAIN_EXAMPLE
    from gapt.engine.trainer import check_model_config
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert TRAIN_EXAMPLE in capsys.readouterr().out
    words = shlex.split(TRAIN_EXAMPLE)
    assert words[:2] == ["gapt", "train"]
    args = build_parser().parse_args(words[1:])
    cfg = load_config(args.config, args.overrides)
    check_model_config(cfg)  # every setting valid, no file or download needed
    assert cfg.weights is None and cfg.data.format == "shapes"


def test_output_piped_into_a_reader_that_stops_is_not_a_traceback():
    # `gapt keys | head -1`: head exits after one line; gapt must stop quietly with status 0
    import subprocess, sys
    proc = subprocess.Popen([sys.executable, "-m", "gapt", "keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader is gone; gapt's next writes hit a broken pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
