"""A real text-classification task that needs no download: which part of the Python standard library does a
docstring come from?

Every Python installation ships these texts: the first paragraph of each public function, class and method
docstring of 55 standard-library modules, grouped into 6 topics by the module it documents (files and the OS,
text processing, math, networking, concurrency, data formats). They are real, human-written English sentences
("Return the canonical string representation of the object.", "Open a socket connection…"), the labels come from
the library's own structure, not from us, and the task is not trivial: generic phrasing ("Return a copy of …")
appears under every topic. A sentence encoder starts well above chance (6 classes: 16.7%) with a fresh linear head
only after training, which is what the fine-tuning has to deliver.

The examples are deduplicated, capped per topic (so the classes are balanced) and split into train/test by a hash
of the text, so the split is the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, ...]] = {
    "files and the OS": ("os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "fnmatch", "filecmp"),
    "text processing": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "locale", "gettext"),
    "math and numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "networking and web": ("socket", "http.client", "http.server", "http.cookiejar", "urllib.request",
                           "urllib.parse", "email.message", "smtplib", "ssl", "ftplib", "ipaddress"),
    "concurrency": ("threading", "multiprocessing.pool", "asyncio", "concurrent.futures", "queue", "subprocess",
                    "sched", "selectors"),
    "data formats": ("json", "csv", "pickle", "xml.etree.ElementTree", "zipfile", "tarfile", "gzip", "sqlite3",
                     "configparser", "shelve", "plistlib"),
}


@dataclass
class Split:
    texts: list[str]
    labels: list[int]


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    if len(text) < 25 or not re.search(r"[a-z]{3}", text):
        return None
    return text[:300]


def _docstrings(module_name: str):
    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
        home = getattr(obj, "__module__", None) or ""
        if name.startswith("_") or not (home == module.__name__ or home.startswith(module.__name__ + ".")):
            continue  # re-exports from elsewhere (asyncio's members live in asyncio.tasks etc., which count)
        if inspect.isclass(obj):
            yield _first_paragraph(obj.__doc__)
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    yield _first_paragraph(getattr(member, "__doc__", None))
        elif callable(obj):
            yield _first_paragraph(obj.__doc__)


def load(per_topic: int = 160, test_fraction: float = 0.25) -> tuple[Split, Split, list[str]]:
    """(train, test, topic names): up to `per_topic` examples per topic, the same count for every topic."""
    by_topic: list[list[str]] = []
    seen: set[str] = set()
    for modules in TOPICS.values():
        texts = []
        for module_name in modules:
            for text in _docstrings(module_name):
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
        by_topic.append(sorted(texts, key=_digest))
    count = min(per_topic, *(len(t) for t in by_topic))
    train, test = Split([], []), Split([], [])
    for label, texts in enumerate(by_topic):
        for text in texts[:count]:
            part = test if int(_digest("split:" + text)[:8], 16) / 0xFFFFFFFF < test_fraction else train
            part.texts.append(text)
            part.labels.append(label)
    return train, test, list(TOPICS)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
