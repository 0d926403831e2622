#!/usr/bin/env python
"""Megatron-core GPT pretraining driver (Megatron-LM flags plus megatron-offload-plugin flags).

    torchrun --nproc-per-node 4 scripts/pretrain_gpt.py --pipeline-model-parallel-size 4 ...

or, as a Megatron-LM user would run their own script:

    torchrun --nproc-per-node 4 -m megatron_offload_plugin.launch scripts/pretrain_gpt.py ...
"""

import sys

from megatron_offload_plugin.integrations.megatron.driver import main

if __name__ == "__main__":
    sys.exit(main())
