"""Who controls a child (pure): the operator creates a child only where none exists, and updates or deletes one only
when the custom resource's uid is its controller ownerReference. Anything else with a child's name is left alone.

A child controlled by an earlier object of the same kind and name (deleted, its children not yet garbage-collected)
is waited for; any other (no controller, or another one) is a conflict: condition ChildConflict and a Warning
event that names it, never an overwrite or a delete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dreambooth_operator import podstate

ChildKey = tuple[str, str]
"""(kind, name) of a child."""
ObservedChildren = Mapping[ChildKey, Mapping[str, Any] | None]
"""The children as read from the API server, by (kind, name); None where none exists."""


def controller_ref(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if isinstance(r, Mapping) and r.get("controller")), None)


def controlled_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    return bool(owner_uid) and podstate.controller_uid(obj) == owner_uid


@dataclass(frozen=True)
class Foreign:
    """A child's name taken by an object that the custom resource does not control."""

    kind: str
    name: str
    controller: str
    """Its controller, in words ("no controller", "DreamBoothJob dog")."""
    leftover: bool
    """Controlled by an earlier object of the owner's kind and name: the garbage collector deletes it."""
    deleting: bool

    @property
    def message(self) -> str:
        if self.leftover or self.deleting:
            return f"waiting for the {self.kind} {self.name} of an earlier object with this name to be deleted"
        return (
            f"the {self.kind} {self.name} already exists and is not controlled by this resource ({self.controller}); "
            "the operator neither overwrites nor deletes it: delete or rename it, or give this resource another name"
        )


def foreign(
    kind: str, obj: Mapping[str, Any] | None, owner: Mapping[str, Any], owner_kind: str | None = None
) -> Foreign | None:
    """The conflict when `obj` (a child of `owner`'s, by name) exists and `owner` does not control it."""
    if obj is None:
        return None
    meta = owner.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    if not uid or controlled_by(obj, uid):
        return None
    ref = controller_ref(obj)
    leftover = (
        ref is not None
        and ref.get("kind") == (owner_kind or owner.get("kind"))
        and ref.get("name") == meta.get("name")
        and str(ref.get("uid")) != uid
    )
    controller = f"controller: {ref.get('kind')} {ref.get('name')}" if ref is not None else "no controller"
    name = str((obj.get("metadata") or {}).get("name"))
    return Foreign(kind, name, controller, leftover, podstate.is_deleting(obj))


def foreign_children(children: ObservedChildren, owner: Mapping[str, Any]) -> list[Foreign]:
    """The observed children that `owner` does not control, in the order given."""
    found = (foreign(kind, obj, owner) for (kind, _), obj in children.items())
    return [f for f in found if f is not None]


def conflicts_message(found: list[Foreign]) -> str:
    return "; ".join(f.message for f in found)
