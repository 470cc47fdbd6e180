"""Finished evaluation runs kept on disk, so that an interrupted ``evaluate --json`` continues.

An evaluation of a large set is hours of CPU (5 networks x 1000 epochs); losing it to a killed
process is the costly kind of lost work. Each run of an evaluation draws only from its own
generator (``evaluate_synthetic``), so finished runs can be kept and the rest trained later with
the same result. The runs are kept in ``<json>.partial`` (written atomically after each run) under
a key of everything that defines a run's result: the synthetic set's bytes (its file, or its
folder's files), the test dataset and its options, the network and protocol, the seed and the
device type. A file with another key is set aside (replaced by the first run of the new
evaluation); the file is removed once the full result is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Dict, Optional, Sequence

from .._io import atomic_write_text

FORMAT = "datadam_fast.evaluate.partial/1"


def source_sha256(path: str, chunk: int = 1 << 22, exclude: Sequence[str] = ()) -> str:
    """sha256 of a synthetic set's bytes: the file, or every file of a folder (names and contents).

    ``exclude``: files that are not the set (the evaluation's own outputs, if written into the
    folder, and their temporary files)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        skip = [os.path.abspath(e) for e in exclude]

        def excluded(p: str) -> bool:  # an output itself, or its .partial / .tmp.PID companions
            p = os.path.abspath(p)
            return any(p == e or p.startswith(e + ".") for e in skip)

        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                       if not excluded(os.path.join(d, f)))
    else:
        files = [None]
    for rel in files:
        if rel is not None:
            h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(path if rel is None else os.path.join(path, rel), "rb") as f:
            while b := f.read(chunk):
                h.update(b)
    return h.hexdigest()


def run_key(*, synthetic: str, dataset: str, data_options: Dict, cfg, seed: int, device_type: str,
            outputs: Sequence[str] = ()) -> Dict:
    """What a run's result depends on (``cfg.runs`` does not: run r is the same in any run count).

    ``outputs``: the files the evaluation writes (left out of a folder's hash)."""
    protocol = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "runs"}
    key = {"synthetic_sha256": source_sha256(synthetic, exclude=outputs), "dataset": dataset,
           "data_options": {k: v for k, v in sorted(data_options.items())}, "protocol": protocol, "seed": int(seed),
           "device_type": device_type}
    return json.loads(json.dumps(key))  # as it reads back from the file


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class PartialRuns:
    """The finished runs of one evaluation, read from and recorded into ``path``."""

    def __init__(self, path: str, key: Dict):
        self.path, self.key = path, key
        self.runs: Dict[int, Dict] = {}
        self.set_aside: Optional[str] = None  # why an existing file was not used
        if not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                doc = json.load(f)
            ok = doc.get("format") == FORMAT and doc.get("key") == key
            runs = {int(r): {"accuracy": float(v["accuracy"]), "train_loss": v.get("train_loss"),
                             "train_time_s": v.get("train_time_s")} for r, v in doc.get("runs", {}).items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.set_aside = "unreadable"
            return
        if ok:
            self.runs = runs
        else:
            self.set_aside = "written for another set, protocol, seed or device"

    def record(self, run: int, result: Dict) -> None:
        self.runs[int(run)] = {k: _finite(result.get(k)) for k in ("accuracy", "train_loss", "train_time_s")}
        doc = {"format": FORMAT, "key": self.key, "runs": {str(r): v for r, v in sorted(self.runs.items())}}
        atomic_write_text(self.path, json.dumps(doc, indent=1, allow_nan=False))

    def finish(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
