"""``ssd validate``: check every image and label row; write the validation report (only when clean).

The checks: ``ssd.data.checks``. A refusal names the file, the row and the value.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ssd.data.checks import REPORT, run_validation
from ssd.data.labels import LabelLimits
from ssd.data.layout import DATA_REPORTS, RAW_DIR
from ssd.stages.common import add_params_arguments, add_path_options, settings

PARAMS = ("data.classes", "data.image_size", "data.max_image_pixels", "data.strict", "data.max_boxes_per_image",
          "data.max_label_line_bytes", "data.max_label_rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_options(parser, data=(RAW_DIR, "dataset folder"), out=(DATA_REPORTS, "report folder"))
    add_params_arguments(parser)


def run(args: argparse.Namespace) -> int:
    data = settings(args, PARAMS).data
    report = run_validation(args.data, args.out, data.image_size, data.classes, data.strict, data.max_image_pixels,
                            LabelLimits.of(data))
    counts = ", ".join(f"{s}: {v['images']} images / {v['label_rows']} boxes" for s, v in report["splits"].items())
    print(f"{report['data']} is valid ({counts}); report in {Path(args.out) / REPORT}")
    return 0
