"""`cytoedge report` on a real replayed slide of the bundled frames: PDF looked at as PNG and text, JSON,
FHIR validated by the fhir.resources models, and the refusal to sign a slide with unreviewed cells."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import SAMPLES, free_port, run_cli

pytest.importorskip("reportlab", reason="the report needs reportlab (pip install -e .[report])")
pytest.importorskip("fhir.resources", reason="the FHIR export needs fhir.resources (pip install -e .[report])")
POPPLER = shutil.which("pdftoppm") and shutil.which("pdftotext") and shutil.which("pdfimages")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The 20 bundled frames through the real pipeline, every cells message in the audit log."""
    folder = tmp_path_factory.mktemp("slide")
    audit = folder / "audit.jsonl"
    done = run_cli("-q", "replay", str(SAMPLES), "--pace", "max", "--audit", str(audit),
                   "--publish", f"tcp://127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stderr
    return audit, [json.loads(line) for line in audit.read_text().splitlines()]


def flagged_cells(messages: list[dict]) -> list[tuple[dict, dict]]:
    return [(m, c) for m in messages for c in m["cells"]
            if c["review"] and c["kind"] != "rbc" and c.get("first_seen", True)]


def write_session(path: Path, messages: list[dict], skip: int | None = None) -> dict[str, int]:
    """A reviewer's session: accept every flagged cell, correct every third to lymphocyte (leave out ``skip``)."""
    corrected = 0
    with path.open("w") as out:
        for index, (message, cell) in enumerate(flagged_cells(messages)):
            if index == skip:
                continue
            action = "correct" if index % 3 == 0 and cell["label"] != "lymphocyte" else "accept"
            corrected += action == "correct"
            label = "lymphocyte" if action == "correct" else cell["label"]
            out.write(json.dumps({"run": message["run"], "frame_id": message["frame_id"], "cell_id": cell["id"],
                                  "model_label": cell["label"], "reviewer_label": label, "action": action,
                                  "time": 1.0}) + "\n")
    return {"corrected": corrected}


def expected_white(messages: list[dict], session: Path) -> dict[str, int]:
    """An independent tally: the reviewer's label where decided, else the model's, white cells only."""
    decided = {(d["run"], d["frame_id"], d["cell_id"]): d["reviewer_label"]
               for d in map(json.loads, session.read_text().splitlines()) if "event" not in d}
    counts: dict[str, int] = {}
    for message in messages:
        for cell in message["cells"]:
            if cell["kind"] == "rbc" or not cell["first_seen"]:
                continue
            label = decided.get((message["run"], message["frame_id"], cell["id"]))
            if label is None and cell["kind"] == "platelet":
                continue
            label = label or cell["label"]
            if label != "platelet":
                counts[label] = counts.get(label, 0) + 1
    return counts


@pytest.mark.skipif(not POPPLER, reason="needs poppler-utils (pdftoppm, pdftotext, pdfimages)")
def test_signed_report_of_a_replayed_slide_shows_every_field_and_the_cell_pictures(
    tmp_path: Path, replayed: tuple[Path, list[dict]]
) -> None:
    audit, messages = replayed
    session = tmp_path / "slide-20261130-120000.jsonl"
    write_session(session, messages)
    pdf, report_json, fhir_json = tmp_path / "slide.pdf", tmp_path / "slide.json", tmp_path / "fhir.json"
    done = run_cli("report", str(session), "--audit", str(audit), "--out", str(pdf), "--json", str(report_json),
                   "--fhir", str(fhir_json), "--sign", "Dr Ada Reviewer", "--microscope", "bench-3")
    assert done.returncode == 0, done.stderr
    assert "signed by Dr Ada Reviewer" in done.stdout
    last = json.loads(session.read_text().splitlines()[-1])  # the signature joins the slide's record
    assert last["event"] == "signoff" and last["name"] == "Dr Ada Reviewer"

    content = json.loads(report_json.read_text())
    flagged = len(flagged_cells(messages))
    assert content["review"] == {"flagged": flagged, "reviewed": flagged, "unreviewed": 0,
                                 "corrected": content["review"]["corrected"]}
    assert content["review"]["corrected"] > 0
    assert {r["class"]: r["count"] for r in content["differential"] if r["count"]} == expected_white(messages, session)
    assert content["model"]["id"] == messages[0]["model"]
    assert len(content["model"]["card_sha256"]) == 64
    assert content["signoff"]["name"] == "Dr Ada Reviewer"
    assert content["domain_alarm"]["banner"].startswith("RUN NOT CHECKED")  # 20 frames < the alarm's window

    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for needle in ("slide-20261130-120000", "bench-3", messages[0]["run"], messages[0]["model"],
                   content["model"]["card_sha256"], "RUN NOT CHECKED", f"{content['white_total']} white cells counted",
                   "TARGET NOT REACHED", f"{flagged} flagged, {flagged} reviewed", "0 still unreviewed",
                   "Signed by Dr Ada Reviewer", "lymphocyte", "Domain-alarm history"):
        assert needle in text, needle

    listed = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert len(listed.splitlines()) - 2 == flagged  # one picture per flagged cell (the header is two lines)

    subprocess.run(["pdftoppm", "-r", "50", "-png", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert pages
    colourful = 0
    for page in pages:
        hsv = cv2.cvtColor(cv2.imread(str(page)), cv2.COLOR_BGR2HSV)
        colourful += int(np.count_nonzero(hsv[..., 1] > 60))
    assert colourful > 5_000  # stained cells (and the red banner) are on the pages, not blank boxes


def test_fhir_export_is_a_valid_r4_diagnostic_report_with_loinc_observations(
    tmp_path: Path, replayed: tuple[Path, list[dict]]
) -> None:
    from fhir.resources.R4B.bundle import Bundle

    audit, messages = replayed
    session = tmp_path / "slide-a.jsonl"
    write_session(session, messages)
    out = tmp_path / "fhir.json"
    done = run_cli("report", str(session), "--audit", str(audit), "--out", str(tmp_path / "a.pdf"),
                   "--fhir", str(out), "--sign", "Dr B")
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    Bundle.model_validate(document)  # raises on anything R4 does not allow
    report = document["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert report["resultsInterpreter"][0]["display"] == "Dr B"
    observations = {e["resource"]["code"]["text"]: e["resource"] for e in document["entry"][1:]}
    assert observations["lymphocyte"]["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "736-9",
        "display": "Lymphocytes/100 leukocytes in Blood by Automated count"}
    assert observations["neutrophil"]["code"]["coding"][0]["code"] == "770-8"
    assert abs(sum(o["valueQuantity"]["value"] for o in observations.values()) - 100.0) < 0.5
    assert len(report["result"]) == len(observations)


def test_slide_with_an_unreviewed_flagged_cell_cannot_be_signed(
    tmp_path: Path, replayed: tuple[Path, list[dict]]
) -> None:
    audit, messages = replayed
    session = tmp_path / "slide-b.jsonl"
    write_session(session, messages, skip=3)
    pdf = tmp_path / "b.pdf"
    done = run_cli("report", str(session), "--audit", str(audit), "--out", str(pdf), "--sign", "Dr C")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "cannot be signed: 1 of" in done.stderr and "unreviewed" in done.stderr
    assert not pdf.exists()
    # unsigned, the same slide still makes a draft that says why it is not signed
    done = run_cli("report", str(session), "--audit", str(audit), "--out", str(pdf), "--json", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "b.json").read_text())["signoff"] is None
    assert all("event" not in json.loads(line) for line in session.read_text().splitlines())  # no signature kept


def test_report_counts_only_the_frames_of_the_slide_named_by_the_displays_slide_end_line(
    tmp_path: Path, replayed: tuple[Path, list[dict]]
) -> None:
    """A live run goes on across slides: the display's slide-end line says which frames were this slide."""
    audit, messages = replayed
    first, rest = messages[:8], messages[8:]
    session = tmp_path / "slide-d.jsonl"
    write_session(session, first)
    with session.open("a") as out:
        out.write(json.dumps({"event": "slide-end", "slide": "slide-d", "started_at": 10.0, "ended_at": 20.0,
                              "target": 100, "frames": {first[0]["run"]: [0, 7]}}) + "\n")
    out_json = tmp_path / "d.json"
    done = run_cli("report", str(session), "--audit", str(audit), "--out", str(tmp_path / "d.pdf"),
                   "--json", str(out_json), "--sign", "Dr D")
    assert done.returncode == 0, done.stderr  # the later frames' flagged cells are not this slide's
    content = json.loads(out_json.read_text())
    assert content["frames"] == 8 and rest
    assert content["review"]["flagged"] == len(flagged_cells(first))
    assert (content["started_at"], content["ended_at"]) == (10.0, 20.0)
    assert content["red_cells"] == sum(c["kind"] == "rbc" and c["first_seen"] for m in first for c in m["cells"])


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["missing.jsonl", "--audit", "x.jsonl", "--out", "o.pdf"], 2, "session file not found"),
        (["SESSION", "--audit", "missing-audit.jsonl", "--out", "o.pdf"], 2, "cannot read"),
        (["SESSION", "--audit", "AUDIT", "--out", "o.pdf", "--run", "no-such-run"], 1, "no cells messages"),
        (["SESSION", "--audit", "AUDIT", "--out", "o.pdf", "--target", "7"], 2, "invalid choice"),
        (["SESSION", "--audit", "SESSION", "--out", "o.pdf"], 1, "no cells messages"),
    ],
)
def test_bad_report_input_ends_in_one_line_and_its_exit_code(
    tmp_path: Path, replayed: tuple[Path, list[dict]], args: list[str], code: int, words: str
) -> None:
    audit, messages = replayed
    session = tmp_path / "slide-c.jsonl"
    write_session(session, messages)
    args = [str(session) if a == "SESSION" else str(audit) if a == "AUDIT" else
            str(tmp_path / a) if a.endswith((".jsonl", ".pdf")) else a for a in args]
    done = run_cli("report", *args)
    assert done.returncode == code
    assert words in done.stderr
    assert "Traceback" not in done.stderr
