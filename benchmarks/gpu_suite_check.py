"""Check what ``benchmarks/gpu_suite.sh`` left in its ``$OUT``: what a GPU machine would send back.

* at most 8 files (what the device tool returns), none deeper than 2 folders;
* ``summary.txt`` names every stage of the suite's plan (and the background build);
* ``gpu_suite.tgz`` opens and every JSON file in it parses;
* with ``--all-ok``: every stage line says ``ok`` (the dry run in CI);
* with ``--max-seconds N``: the suite's elapsed time (summary header) is at most N.

    DRY=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh && python benchmarks/gpu_suite_check.py /tmp/suite --all-ok
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_FILES = 8


def planned_stages() -> list:
    """The stage names of the suite's default plan (``PLAN_ONLY=1``), in order."""
    out = subprocess.run(["bash", os.path.join(HERE, "gpu_suite.sh")], env=dict(os.environ, PLAN_ONLY="1"),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [ln.split()[0] for ln in out[1:] if ln and not ln.startswith("caps add up")]


def check(out_dir: str, all_ok: bool = False, max_seconds: float = None) -> list:
    problems = []
    files = []
    for root, _, names in os.walk(out_dir):
        depth = os.path.relpath(root, out_dir).count(os.sep) + (0 if root == out_dir else 1)
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), out_dir))
            if depth > 2:
                problems.append(f"{files[-1]}: deeper than 2 folders (would not come back)")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out_dir}, at most {MAX_FILES} come back: {sorted(files)}")
    summary_path = os.path.join(out_dir, "summary.txt")
    if not os.path.isfile(summary_path):
        return problems + [f"no summary.txt in {out_dir}"]
    lines = open(summary_path).read().splitlines()
    status = {}
    for ln in lines[1:]:
        name, _, rest = ln.partition(": ")
        status[name] = rest
    for s in ["build (background)"] + planned_stages():
        if s not in status:
            problems.append(f"summary.txt does not name stage {s!r}")
        elif all_ok and s != "build (background)" and not status[s].startswith("ok"):
            problems.append(f"stage {s}: {status[s]}")
    if all_ok and not status.get("build (background)", "").startswith("rc 0"):
        problems.append(f"background build: {status.get('build (background)')}")
    m = re.search(r"elapsed=(\d+)s", lines[0] if lines else "")
    if max_seconds is not None and (m is None or int(m.group(1)) > max_seconds):
        problems.append(f"the suite took {m.group(1) if m else '?'} s, more than {max_seconds:g} s")
    tgz = os.path.join(out_dir, "gpu_suite.tgz")
    if not os.path.isfile(tgz):
        return problems + [f"no gpu_suite.tgz in {out_dir}"]
    n_json = 0
    with tarfile.open(tgz) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith(".json"):
                n_json += 1
                try:
                    json.loads(tf.extractfile(member).read())
                except ValueError as e:
                    problems.append(f"{member.name} in the archive is not valid JSON: {e}")
    if n_json == 0:
        problems.append("the archive holds no JSON")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the suite's OUT folder")
    ap.add_argument("--all-ok", action="store_true", help="every stage must have passed")
    ap.add_argument("--max-seconds", type=float, default=None, help="the suite's elapsed time at most this")
    args = ap.parse_args(argv)
    problems = check(args.out, args.all_ok, args.max_seconds)
    for p in problems:
        print(f"gpu suite output: {p}", file=sys.stderr)
    if not problems:
        print(f"gpu suite output in {args.out}: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
