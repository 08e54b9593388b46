"""Options generated from the commands' config dataclasses, and TRL-style YAML `--config FILE`."""

from __future__ import annotations

import dataclasses

import pytest

from trl_pplmask.commands import build, demo, mask, push, score, self_output


@pytest.mark.parametrize("module", [score, mask, demo, build, push, self_output], ids=lambda m: m.__name__)
def test_every_field_is_an_option_with_its_help(module):
    parser = module.make_parser()
    config = next(
        getattr(module, name)
        for name in dir(module)
        if dataclasses.is_dataclass(getattr(module, name)) and getattr(module, name).__module__ == module.__name__
    )
    actions = {action.dest: action for action in parser._actions}
    for item in dataclasses.fields(config):
        action = actions.get(item.name)
        assert action is not None, f"{module.__name__}: field {item.name} has no option"
        assert action.help == item.metadata["help"], item.name
        if item.default is not dataclasses.MISSING:
            assert action.default == item.default, item.name


def test_yaml_config_sets_options_and_flags_override_it(tmp_path):
    path = tmp_path / "mask.yaml"
    path.write_text("input: scored\noutput: masked\nstrategy: random\nthreshold: 5.0\noverwrite: true\n")
    args = mask.make_parser().parse_args(["--config", str(path)])
    assert (args.input, args.output, args.strategy, args.threshold, args.overwrite) == (
        "scored",
        "masked",
        "random",
        5.0,
        True,
    )
    args = mask.make_parser().parse_args(["--config", str(path), "--threshold", "3", "--output", "other"])
    assert (args.threshold, args.output, args.strategy) == (3.0, "other", "random")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("input: a\noutput: b\nthreshhold: 3\n", "unknown setting 'threshhold'"),
        ("input: a\noutput: b\nstrategy: bogus\n", "invalid choice: 'bogus'"),
        ("input: a\noutput: b\noverwrite: maybe\n", "overwrite"),
        ("- input\n- a\n", "must map settings to values"),
        ("input: [a\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_config_is_one_clear_error(text, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        mask.make_parser().parse_args(["--config", str(path)])
    assert exit.value.code == 2
    assert expected in capsys.readouterr().err


def test_missing_yaml_config_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mask.make_parser().parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "--config" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, data_dir, capsys):
    """`make demo` in small: the embedded model scores, masks and trains (one step) with the collator."""
    from trl_pplmask.cli import main

    assert main(["demo", "--output", str(tmp_path / "demo"), "--num-examples", "4", "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] Summary" in out and "masked fraction" in out
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").is_file()
