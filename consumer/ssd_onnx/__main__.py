import sys

from ssd_onnx.cli import main

sys.exit(main())
