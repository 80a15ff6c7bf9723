"""The slide as HL7 FHIR R4: a DiagnosticReport and one Observation per white-cell class, in a Bundle.

Built with the `fhir.resources` models (its R4B package: R4B keeps R4's DiagnosticReport and
Observation unchanged), so a field the standard does not allow fails here, not at the LIS.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from edge.report.slide import Slide

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PANEL = ("57023-4", "Auto Differential panel - Blood")
# class name → LOINC "<cells>/100 leukocytes in Blood by Automated count"
CODES: dict[str, tuple[str, str]] = {
    "neutrophil": ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count"),
    "lymphocyte": ("736-9", "Lymphocytes/100 leukocytes in Blood by Automated count"),
    "monocyte": ("5905-5", "Monocytes/100 leukocytes in Blood by Automated count"),
    "eosinophil": ("713-8", "Eosinophils/100 leukocytes in Blood by Automated count"),
    "basophil": ("706-2", "Basophils/100 leukocytes in Blood by Automated count"),
    "ig": ("71695-1", "Immature granulocytes/100 leukocytes in Blood by Automated count"),
    "erythroblast": ("58413-6", "Nucleated erythrocytes/100 leukocytes in Blood by Automated count"),
}
LOCAL = "urn:cytoedge:class"  # a class the model has but LOINC's list above does not


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def bundle(slide: Slide) -> dict[str, Any]:
    """The Bundle as JSON-ready dict, validated by the fhir.resources models (ValidationError if not)."""
    status = "final" if slide.signoff else "preliminary"
    effective = _iso(slide.ended_at)
    observations = []
    for row in slide.differential():
        code, display = CODES.get(row["class"], (row["class"], f"{row['class']}/100 leukocytes (cytoedge class)"))
        system = LOINC if row["class"] in CODES else LOCAL
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cytoedge:{slide.slide_id}:{row['class']}")),
            "status": status,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": system, "code": code, "display": display}], "text": row["class"]},
            "valueQuantity": {"value": row["percent"], "unit": "%", "system": UCUM, "code": "%"},
            "note": [{"text": f"{row['count']} of {slide.white_total} white cells counted"}],
        }
        if effective:
            observation["effectiveDateTime"] = effective
        observations.append(observation)
    conclusion = (
        f"{slide.white_total} white cells counted (target {slide.target}"
        f"{' reached' if slide.target_reached else ' NOT reached'}); {slide.flagged} flagged, "
        f"{slide.reviewed} reviewed, {slide.corrected} corrected, {slide.unreviewed} unreviewed."
    )
    if slide.banner:
        conclusion = slide.banner + ". " + conclusion
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cytoedge:{slide.slide_id}")),
        "identifier": [{"system": "urn:cytoedge:slide", "value": f"{slide.microscope}/{slide.slide_id}"}],
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM",
                                  "display": "Hematology"}]}],
        "code": {"coding": [{"system": LOINC, "code": PANEL[0], "display": PANEL[1]}]},
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
        "conclusion": conclusion,
    }
    if slide.started_at is not None and slide.ended_at is not None:
        report["effectivePeriod"] = {"start": _iso(slide.started_at), "end": _iso(slide.ended_at)}
    if slide.signoff:
        report["issued"] = _iso(slide.signoff.time)
        report["resultsInterpreter"] = [{"display": slide.signoff.name}]
    if slide.model:
        report["performer"] = [{"display": f"cytoedge {slide.model} on {slide.microscope}"}]
    entries = [{"fullUrl": f"urn:uuid:{report['id']}", "resource": report}]
    entries += [{"fullUrl": f"urn:uuid:{o['id']}", "resource": o} for o in observations]
    document = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    if slide.signoff:
        document["timestamp"] = _iso(slide.signoff.time)
    return json.loads(Bundle.model_validate(document).model_dump_json(exclude_none=True))
