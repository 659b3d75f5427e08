import sys

from vincie.cli import main

sys.exit(main())
