import sys

from instantid_colab.cli import main

sys.exit(main())
