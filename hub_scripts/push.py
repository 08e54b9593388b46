"""Upload a folder built by `hub_scripts/build_pplmasked.py` to a Hub dataset repo (or list it with --dry-run).

The same as `trl-pplmask push` (see `trl_pplmask.hub.push_folder`). The token comes from `--token`, `HF_TOKEN` or
`hf auth login`; a failed push says why and leaves the folder as it was.

```bash
python hub_scripts/push.py gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked --dry-run
python hub_scripts/push.py gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked --create-pr
```
"""

from __future__ import annotations

import argparse
import sys

from trl_pplmask.hub.cli import add_push_args, cmd_push


PROG = "python hub_scripts/push.py"


def main(argv: list[str] | None = None) -> int:
    parser = add_push_args(argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return cmd_push(args, prog=PROG)
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
