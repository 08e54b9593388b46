"""The `trl-pplmask` subcommands, one module each: the top layer of the package (nothing else imports from it).

Each module has the command's config dataclass (its options are generated from the fields, see `_args`; `build`'s
is [`~trl_pplmask.hub.BuildConfig`] itself, `eval`'s are `EvalArguments` and [`~trl_pplmask.evaluation.EvalConfig`]
with its repeatable options written by hand), its `run` function and a `COMMAND` ([`_command.Command`]) naming
both, from which `register_cli(subparsers)` (used by `trl_pplmask.cli`), `make_parser()` and `main(argv)` (used by
`hub_scripts/`, and `python -m trl_pplmask.commands.<name>`) are generated. Importing one loads neither torch nor the
data libraries, so that `--help` answers fast; the work imports them when it runs. `sft` is parsed by TRL's own
parser instead (every `trl sft` flag and recipe).

Shared: `_command` (the command description), `_args` (options from a dataclass, YAML `--config FILE`), `_run` (errors
reported in one line, SIGTERM) and `_io` (the datasets in and out of `score` and `mask`).
"""
