import sys

from dinotune.cli import main

sys.exit(main())
