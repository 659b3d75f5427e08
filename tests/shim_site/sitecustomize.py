"""TEST-ONLY: Python imports `sitecustomize` at start-up from PYTHONPATH; tests put this directory there so the
`vincie` processes they launch (torchrun workers included) run megatron-core on CPU with the shim."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_cpu_shim  # noqa: E402

megatron_cpu_shim.install()
