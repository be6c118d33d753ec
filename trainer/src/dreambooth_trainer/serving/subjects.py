"""Which subjects (LoRA adapters) the server can load, by name: published without a restart.

A subject's name is looked up, in this order, in
1. the config's `adapters` (fixed for the process; also on by default for requests to the base model);
2. the subjects file (`subjectsFile`, `dreambooth_api.serving.SubjectsFile`: JSON `{name: uri}`), re-read whenever
   its modification time, size or inode changes (a ConfigMap volume's update swaps a symlink: a new inode);
3. the adapter prefix (`adapterPrefix`): `<prefix>/<name>/lora/pytorch_lora_weights.safetensors`, the LoRA export of
   a DreamBoothJob whose `output.uri` is `<prefix>/<name>/`. Found with one HEAD request on first use; a name not
   found is asked again after `MISS_SECONDS`, so a job that succeeds later is servable within seconds.

Methods may do object-storage I/O: call them from a worker thread, not the event loop.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from dreambooth_api.common import DNS_LABEL_PATTERN, URI_PATTERN
from dreambooth_api.serving import ServeConfig, SubjectsFile
from dreambooth_trainer.export.writers import LORA_WEIGHT_NAME
from dreambooth_trainer.storage import ObjectStore, join_uri, relative_path

MISS_SECONDS: Final = 2.0
"""How long a name not found under the adapter prefix stays not found before storage is asked again."""
LIST_SECONDS: Final = 10.0
"""How long a listing of the adapter prefix (for GET /v1/models) is reused."""
_NAME = re.compile(DNS_LABEL_PATTERN)
_URI = re.compile(URI_PATTERN)


@dataclass(frozen=True)
class Subject:
    """A servable LoRA adapter: its name, its weights' URI and its default weight."""

    name: str
    uri: str
    weight: float = 1.0
    source: str = "config"
    """config, file or prefix."""


class SubjectCatalog:
    """The subjects by name, from the config, the subjects file and the adapter prefix."""

    def __init__(
        self,
        config: ServeConfig,
        store: ObjectStore,
        *,
        log: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fixed = {a.name: Subject(a.name, a.uri, a.weight) for a in config.adapters}
        self.prefix = config.adapter_prefix.rstrip("/") if config.adapter_prefix else None
        self.file = Path(config.subjects_file) if config.subjects_file else None
        self._log = log or (lambda *_a, **_k: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._file_stamp: tuple[int, int, int] | None = None
        self._file_subjects: dict[str, Subject] = {}
        self._found: dict[str, Subject] = {}
        self._missed: dict[str, float] = {}
        self._listing: tuple[float, list[Subject]] | None = None

    def defaults(self) -> list[Subject]:
        """The config's adapters: on at their weight for a request to the base model that names none."""
        return list(self.fixed.values())

    def resolve(self, name: str) -> Subject | None:
        """The subject of that name, or None."""
        if name in self.fixed:
            return self.fixed[name]
        listed = self.file_subjects().get(name)
        if listed is not None:
            return listed
        return self._under_prefix(name) if self.prefix is not None and _NAME.fullmatch(name) else None

    def _under_prefix(self, name: str) -> Subject | None:
        assert self.prefix is not None
        with self._lock:
            if name in self._found:
                return self._found[name]
            missed = self._missed.get(name)
            if missed is not None and self._clock() - missed < MISS_SECONDS:
                return None
        uri = join_uri(self.prefix, name, "lora", LORA_WEIGHT_NAME)
        found = self.store.exists(uri)
        with self._lock:
            if found:
                self._found[name] = Subject(name, uri, source="prefix")
                self._missed.pop(name, None)
                return self._found[name]
            self._missed[name] = self._clock()
        return None

    def all(self) -> list[Subject]:
        """Every subject the server can load, sorted by name (an earlier source wins a name)."""
        found: dict[str, Subject] = {}
        listed = self._prefix_listing()
        with self._lock:
            listed += list(self._found.values())  # found since the listing
        for subject in [*listed, *self.file_subjects().values(), *self.fixed.values()]:
            found[subject.name] = subject
        return [found[k] for k in sorted(found)]

    def file_subjects(self) -> dict[str, Subject]:
        """The subjects file's entries, re-read when the file changed (the last good content if it cannot be
        read or parsed)."""
        if self.file is None:
            return {}
        try:
            st = self.file.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp == self._file_stamp:
                return self._file_subjects
        subjects = self._read_file() if stamp is not None else {}
        with self._lock:
            if subjects is not None:
                self._file_subjects = subjects
            self._file_stamp = stamp
            return self._file_subjects

    def _read_file(self) -> dict[str, Subject] | None:
        assert self.file is not None
        try:
            doc = SubjectsFile.model_validate(json.loads(self.file.read_text()))
        except (OSError, ValueError, ValidationError) as err:
            self._log("warning", "subjects_file_unreadable", path=str(self.file), error=str(err)[:500])
            return None
        subjects: dict[str, Subject] = {}
        for name, uri in doc.root.items():
            if not _NAME.fullmatch(name) or len(name) > 63 or not _URI.fullmatch(uri):
                self._log("warning", "subject_skipped", name=name[:100], uri=uri[:300])
                continue
            subjects[name] = Subject(name, uri, source="file")
        self._log("info", "subjects_file_read", path=str(self.file), subjects=len(subjects))
        return subjects

    def _prefix_listing(self) -> list[Subject]:
        if self.prefix is None:
            return []
        now = self._clock()
        with self._lock:
            if self._listing is not None and now - self._listing[0] < LIST_SECONDS:
                return list(self._listing[1])
        subjects = []
        for obj in self.store.list(self.prefix):
            parts = relative_path(self.prefix, obj.uri).split("/")
            if len(parts) == 3 and parts[1:] == ["lora", LORA_WEIGHT_NAME] and _NAME.fullmatch(parts[0]):
                subjects.append(Subject(parts[0], obj.uri, source="prefix"))
        with self._lock:
            self._listing = (now, subjects)
            for s in subjects:
                self._found.setdefault(s.name, s)
        return list(subjects)
