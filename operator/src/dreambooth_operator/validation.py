"""Operator-side validation of a DreamBoothJob: every problem, not just the first (JobSet-webhook style).

The CRD schema and its CEL rules reject most bad specs at `kubectl apply`; this checks what they cannot:
generated child names fit in a DNS label, reserved env names, and that the operator-owned sections parse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from dreambooth_api.job import DreamBoothJobSpec
from dreambooth_operator import names
from dreambooth_operator.layout import RESERVED_ENV


def validate(job: Mapping[str, Any]) -> list[str]:
    """All the reasons the operator cannot run this job (empty when it can)."""
    errors: list[str] = []
    name = str(job.get("metadata", {}).get("name", ""))
    if not names.DNS_1035_LABEL.match(name):
        errors.append(
            f"metadata.name {name!r} must be a DNS label (lowercase letters, digits and '-', starting with a "
            "letter): it names the pods' hostnames and the headless Service"
        )
    longest = names.longest_child_label(name)
    if len(longest) > names.DNS_LABEL_MAX:
        errors.append(
            f"metadata.name is {len(name)} characters; at most {names.max_job_name_length()} fit, because the "
            f"child name {longest!r} must be at most {names.DNS_LABEL_MAX}"
        )
    try:
        spec = DreamBoothJobSpec.model_validate(job.get("spec") or {})
    except ValidationError as err:
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            errors.append(f"spec.{loc}: {e['msg']}")
        return errors
    # The API server's CEL rules, in Python (same messages), for objects created before the rules existed.
    errors.extend(spec.cross_section_errors())
    if spec.pod_template and spec.pod_template.env:
        reserved = sorted({e.name for e in spec.pod_template.env} & RESERVED_ENV)
        if reserved:
            errors.append(f"spec.podTemplate.env may not set {', '.join(reserved)} (the operator sets them)")
    wire = spec.model_dump(by_alias=True)
    errors.extend(
        f"spec.{section} is required"
        for section in ("baseModel", "instanceImages", "output")
        if not isinstance(wire.get(section), dict)
    )
    return errors
