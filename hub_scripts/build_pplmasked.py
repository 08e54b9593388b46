"""Build a `<task>-pplmasked` Hub-layout dataset folder: one config per scoring model, parquet shards, card, figures.

The same pipeline as `trl-pplmask build` (see `trl_pplmask.hub.build_pplmasked`):

```bash
python hub_scripts/build_pplmasked.py --dataset gsm8k --splits train test \
    --models meta-llama/Llama-3.1-8B-Instruct google/gemma-2-2b-it --dtype bfloat16 \
    --output-dir gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked
python hub_scripts/push.py gsm8k-pplmasked --dry-run
```
"""

from __future__ import annotations

import argparse
import os
import sys

from trl_pplmask.hub.cli import add_build_args, cmd_build


PROG = "python hub_scripts/build_pplmasked.py"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = add_build_args(argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return cmd_build(args, prog=PROG)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
