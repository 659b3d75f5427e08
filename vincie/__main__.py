import sys

from vincie.cli.main import main

# the guard matters: megatron-core's dist_checkpointing may start processes that re-import the main module
if __name__ == "__main__":
    sys.exit(main())
