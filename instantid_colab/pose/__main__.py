import sys

from instantid_colab.pose.cli import main

sys.exit(main())
