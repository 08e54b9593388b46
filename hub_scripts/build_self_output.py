"""Build a `<task>-self-output` Hub-layout dataset folder: the model's own verified answers, one config per model.

The same pipeline as `trl-pplmask self-output` (see `trl_pplmask.hub.self_output.build_self_output`). Generation
resumes from `<output-dir>-checkpoints/` when rerun with the same arguments. For example, the paper's setting on a GPU:

```bash
python hub_scripts/build_self_output.py --dataset mbpp --models meta-llama/Meta-Llama-3-8B-Instruct \
    --num-samples 32 --temperature 0.7 --top-p 0.95 --max-new-tokens 512 --backend vllm --dtype bfloat16 \
    --output-dir mbpp-self-output --repo-id trl-pplmask/mbpp-self-output
python hub_scripts/push.py mbpp-self-output --dry-run
```
"""

from __future__ import annotations

import sys

from trl_pplmask.commands import self_output


PROG = "python hub_scripts/build_self_output.py"


def main(argv: list[str] | None = None) -> int:
    return self_output.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
