"""Names fit in DNS labels, and validation reports every problem at once."""

from __future__ import annotations

import pytest

from dreambooth_api.job import SPEC_RULES
from dreambooth_operator import names
from dreambooth_operator.validation import validate
from tests.infra.wrappers import make_job


def test_child_names_are_deterministic() -> None:
    assert names.configmap_name("cat") == "cat-config"
    assert names.service_name("cat") == "cat-workers"
    assert names.batch_job_name("cat", 3) == "cat-a3"
    assert names.master_address("cat", 3) == "cat-a3-0.cat-workers"


def test_longest_allowed_name_fits_and_one_more_does_not() -> None:
    longest = "j" * names.max_job_name_length()
    assert validate(make_job(longest).obj()) == []
    assert len(names.pod_hostname(longest, 999, 999)) == names.DNS_LABEL_MAX
    errors = validate(make_job(longest + "x").obj())
    assert len(errors) == 1
    assert "at most 54 fit" in errors[0]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("cat.v2", "must be a DNS label"), ("9cat", "must be a DNS label"), ("Cat", "must be a DNS label")],
)
def test_invalid_names(name: str, fragment: str) -> None:
    assert any(fragment in e for e in validate(make_job(name).obj()))


def test_collects_every_error() -> None:
    job = make_job("a" * 60 + ".x").pod_template(env=[{"name": "WORLD_SIZE", "value": "9"}]).obj()
    job["spec"]["resources"]["nodes"] = 2  # without output.checkpointUri
    errors = validate(job)
    assert len(errors) == 4, errors
    assert any("checkpointUri" in e for e in errors)
    assert any("WORLD_SIZE" in e for e in errors)


def test_bad_operator_section_is_reported_with_its_path() -> None:
    job = make_job().obj()
    job["spec"]["resources"]["nodes"] = 0
    assert any(e.startswith("spec.resources.nodes") for e in validate(job))


def test_cross_section_rules_give_the_api_servers_messages() -> None:
    job = make_job().obj()
    job["spec"]["resources"]["nodes"] = 2  # without output.checkpointUri
    job["spec"]["output"]["formats"] = ["lora"]
    job["spec"].setdefault("training", {})["method"] = "full"
    job["spec"]["resources"]["gpusPerNode"] = 0
    job["spec"]["runPolicy"] = {"gpuSecondsLimit": 600}  # without GPUs
    job["spec"]["evaluation"] = {"enabled": True, "judge": True}  # without vlm
    job["spec"]["instanceImages"]["captions"] = "auto"  # without vlm
    errors = validate(job)
    assert [r["message"] for r in SPEC_RULES] == [e for e in errors if e in {r["message"] for r in SPEC_RULES}]
