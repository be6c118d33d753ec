"""The operator's restrictions on the pods a DreamBoothJob or an InferenceService may create (pure).

Creating either resource creates pods with the author's image, ServiceAccount and priority class (docs/security.md).
A platform limits these with operator settings, globally (``DREAMBOOTH_OPERATOR_RESTRICTIONS``) and per namespace
(``DREAMBOOTH_OPERATOR_NAMESPACE_RESTRICTIONS``, a JSON object by namespace whose rules replace the global rule of
the same name). A rule left unset allows anything; an empty list allows only the defaults: the operator's own
trainer image, the namespace's default ServiceAccount, no priority class. A resource that breaks a rule fails at
once with reason PolicyViolation and a message that names the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from dreambooth_api.common import PodTemplateOverrides

# An image prefix stops at one of these (or is the whole image), so that "registry.corp" never admits
# "registry.corp.evil.example/x".
_PREFIX_BOUNDARY: Final = "/:@"


class PodRestrictions(BaseModel):
    """One set of rules (camelCase or snake_case keys in the JSON settings). None (unset) allows anything."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    image_prefixes: tuple[str, ...] | None = None
    """Allowed container images, by prefix (for example "registry.corp/dreambooth/"). A prefix matches at a path,
    tag or digest boundary. The operator's own trainer image is always allowed."""
    service_accounts: tuple[str, ...] | None = None
    """Allowed spec.podTemplate.serviceAccountName values (unset, the namespace's default, is always allowed)."""
    priority_classes: tuple[str, ...] | None = None
    """Allowed spec.podTemplate.priorityClassName values (unset is always allowed)."""


@dataclass(frozen=True)
class Rules:
    """The rules in force in one namespace, and where each comes from (for the messages)."""

    restrictions: PodRestrictions = field(default_factory=PodRestrictions)
    sources: Mapping[str, str] | None = None
    """Per rule (field name): the setting it comes from."""
    default_image: str | None = None
    """The operator's trainer image (always allowed)."""

    def source(self, rule: str) -> str:
        return (self.sources or {}).get(rule, f"the operator setting restrictions.{to_camel(rule)}")


def rules_for(
    namespace: str,
    global_rules: PodRestrictions,
    by_namespace: Mapping[str, PodRestrictions],
    default_image: str | None = None,
) -> Rules:
    """The global rules, each replaced by the namespace's rule of the same name where that one is set."""
    merged = global_rules.model_dump()
    sources = {name: f"the operator setting restrictions.{to_camel(name)}" for name in merged}
    local = by_namespace.get(namespace)
    if local is not None:
        for name, value in local.model_dump().items():
            if value is not None:
                merged[name] = value
                sources[name] = f"the operator setting namespaceRestrictions[{namespace!r}].{to_camel(name)}"
    return Rules(PodRestrictions.model_validate(merged), sources, default_image)


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    for prefix in prefixes:
        if not prefix or not image.startswith(prefix):
            continue
        if image == prefix or prefix[-1] in _PREFIX_BOUNDARY or image[len(prefix)] in _PREFIX_BOUNDARY:
            return True
    return False


def violations(pod_template: PodTemplateOverrides | None, rules: Rules, where: str = "spec.podTemplate") -> list[str]:
    """Every rule the pods of this pod template would break (empty when allowed)."""
    found: list[str] = []
    r = rules.restrictions
    image = pod_template.image if pod_template else None
    if (
        image
        and r.image_prefixes is not None
        and image != rules.default_image
        and not image_allowed(image, r.image_prefixes)
    ):
        allowed = ", ".join(repr(p) for p in r.image_prefixes) or "none but the operator's trainer image"
        found.append(
            f"{where}.image {image!r} is not allowed: images must start with one of {allowed} "
            f"({rules.source('image_prefixes')})"
        )
    account = pod_template.service_account_name if pod_template else None
    if account and r.service_accounts is not None and account not in r.service_accounts:
        allowed = ", ".join(repr(a) for a in r.service_accounts) or "none but the namespace's default"
        found.append(
            f"{where}.serviceAccountName {account!r} is not allowed: allowed are {allowed} "
            f"({rules.source('service_accounts')})"
        )
    priority = pod_template.priority_class_name if pod_template else None
    if priority and r.priority_classes is not None and priority not in r.priority_classes:
        allowed = ", ".join(repr(p) for p in r.priority_classes) or "none"
        found.append(
            f"{where}.priorityClassName {priority!r} is not allowed: allowed are {allowed} "
            f"({rules.source('priority_classes')})"
        )
    return found
