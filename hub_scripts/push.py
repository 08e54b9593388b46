"""Upload a folder built by `hub_scripts/build_pplmasked.py` to a Hub dataset repo (or list it with --dry-run).

The same as `trl-pplmask push` (see `trl_pplmask.hub.push_folder`). The token comes from `--token`, `HF_TOKEN` or
`hf auth login`; a failed push says why and leaves the folder as it was.

```bash
python hub_scripts/push.py gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked --dry-run
python hub_scripts/push.py gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked --create-pr
```
"""

from __future__ import annotations

import sys

from trl_pplmask.commands import push


PROG = "python hub_scripts/push.py"


def main(argv: list[str] | None = None) -> int:
    return push.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
