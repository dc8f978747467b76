"""argparse types the commands share (tritonbn's cli, tune and the perf dataset), below
all of them so that none imports another for them."""
from __future__ import annotations

import argparse


def csv_choices(choices):
    """argparse type: a comma-separated list, each item one of choices."""
    def parse(text):
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{','.join(bad) or repr(text)}: choose from {', '.join(choices)} (comma-separated)")
        return items
    return parse
