"""The slide report as PDF (ReportLab): one document a person can read, sign and file."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from edge.fileutil import atomic_write_bytes
from edge.report.slide import GalleryCell, Slide

GALLERY_MAX = 96  # thumbnails printed; the JSON lists every flagged or corrected cell
THUMB_PX = 96
RED = colors.HexColor("#b00020")


def crop_jpeg(cell: GalleryCell, search: Sequence[Path]) -> bytes | None:
    """The cell's picture: the crop the display saved at review, else cut from its source frame by its box."""
    if cell.crop_jpeg:
        return cell.crop_jpeg
    candidates: list[Path] = []
    if cell.crop:
        candidates += [base / cell.crop for base in search]
    for path in candidates:
        if path.is_file():
            return path.read_bytes()
    if not cell.source or not cell.bbox or len(cell.bbox) != 4:
        return None
    source = Path(cell.source)
    frames = [source] if source.is_absolute() else [base / source for base in search]
    for path in frames:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is None:
            continue
        x, y, w, h = (int(v) for v in cell.bbox)
        crop = image[max(0, y) : y + h, max(0, x) : x + w]
        if crop.size == 0:
            return None
        ok, data = cv2.imencode(".jpg", cv2.resize(crop, (THUMB_PX, THUMB_PX)), [cv2.IMWRITE_JPEG_QUALITY, 90])
        return data.tobytes() if ok else None
    return None


def _when(stamp: float | None) -> str:
    return "—" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def render(slide: Slide, search: Sequence[Path]) -> bytes:
    """PDF bytes; ``search`` = folders where saved crops and replayed frame paths are looked up."""
    styles = getSampleStyleSheet()
    body = styles["BodyText"]
    banner_style = ParagraphStyle("banner", parent=body, textColor=colors.white, fontName="Helvetica-Bold",
                                  fontSize=11, leading=14)
    small = ParagraphStyle("small", parent=body, fontSize=7, leading=8, alignment=1)
    story: list = [Paragraph(f"Slide report — {escape(slide.slide_id)}", styles["Title"])]

    if slide.banner:
        box = Table([[Paragraph(escape(slide.banner), banner_style)]], colWidths=[180 * mm])
        box.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), RED), ("BOX", (0, 0), (-1, -1), 2, RED),
                                 ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
        story += [box, Spacer(1, 4 * mm)]

    facts = [
        ["Slide", slide.slide_id],
        ["Microscope", slide.microscope],
        ["Run(s)", ", ".join(slide.runs)],
        ["Start", _when(slide.started_at)],
        ["End", _when(slide.ended_at)],
        ["Model", slide.model or "—"],
        ["Model card sha256", slide.card_sha256 or "not found"],
        ["Frames", str(slide.frames)],
    ]
    story += [_table(facts, [40 * mm, 140 * mm]), Spacer(1, 4 * mm)]

    reached = "target reached" if slide.target_reached else "TARGET NOT REACHED"
    story.append(Paragraph(
        f"<b>Differential</b>: {slide.white_total} white cells counted of a target of {slide.target} ({reached})",
        body))
    rows = [["class", "count", "%"]] + [[r["class"], str(r["count"]), f"{r['percent']:.1f}"]
                                        for r in slide.differential()]
    rows += [["white cells", str(slide.white_total), "100.0" if slide.white_total else "0.0"],
             ["platelets", str(slide.platelets), ""], ["red cells", str(slide.red_cells), ""]]
    story += [_table(rows, [60 * mm, 30 * mm, 30 * mm], header=True), Spacer(1, 4 * mm)]

    story.append(Paragraph(
        f"<b>Review</b>: {slide.flagged} flagged, {slide.reviewed} reviewed, {slide.corrected} corrected, "
        f"{slide.unreviewed} still unreviewed", body))
    history = [["run", "frames", "domain alarm"]] + [
        [seg["run"], f"{seg['from_frame']}–{seg['to_frame']} ({seg['frames']})", seg["state"]]
        for seg in slide.alarm_history
    ]
    story += [Paragraph("<b>Domain-alarm history</b>", body), _table(history, [60 * mm, 50 * mm, 40 * mm], True),
              Spacer(1, 4 * mm)]

    story.append(_gallery(slide, search, small, body))
    story.append(Spacer(1, 6 * mm))
    if slide.signoff is None:
        sign = "<b>NOT SIGNED</b> — draft" + (
            f": {slide.unreviewed} flagged cell(s) must be reviewed before it can be signed" if slide.unreviewed else ""
        )
    else:
        sign = f"<b>Signed</b> by {escape(slide.signoff.name)} at {_when(slide.signoff.time)}"
    story.append(Paragraph(sign, body))

    out = io.BytesIO()
    doc = SimpleDocTemplate(out, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                            bottomMargin=15 * mm, title=f"Slide report {slide.slide_id}", author="cytoedge")
    doc.build(story)
    return out.getvalue()


def _gallery(slide: Slide, search: Sequence[Path], small: ParagraphStyle, body: ParagraphStyle) -> KeepTogether:
    cells = slide.gallery[:GALLERY_MAX]
    title = f"<b>Flagged and corrected cells</b> ({len(slide.gallery)}"
    title += f", first {GALLERY_MAX} shown)" if len(slide.gallery) > GALLERY_MAX else ")"
    parts: list = [Paragraph(title, body)]
    grid, row = [], []
    for cell in cells:
        data = crop_jpeg(cell, search)
        picture = Image(io.BytesIO(data), 20 * mm, 20 * mm) if data else Paragraph("(no picture)", small)
        if cell.reviewer_label and cell.reviewer_label != cell.model_label:
            caption = f"{escape(str(cell.model_label))} -&gt; <b>{escape(cell.reviewer_label)}</b>"
        elif cell.reviewer_label:
            caption = f"{escape(cell.reviewer_label)} (accepted)"
        else:
            caption = f"{escape(cell.shown_label)} (unreviewed)"
        row.append([picture, Paragraph(caption, small)])
        if len(row) == 8:
            grid.append(row)
            row = []
    if row:
        grid.append(row + [""] * (8 - len(row)))
    if grid:
        table = Table(grid, colWidths=[22.5 * mm] * 8)
        table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
        parts.append(table)
    return KeepTogether(parts[:1]) if not grid else KeepTogether(parts)


def _table(rows: list[list[str]], widths: list[float], header: bool = False) -> Table:
    table = Table(rows, colWidths=widths)  # plain strings: drawn as text, never parsed as markup
    style = [("FONTSIZE", (0, 0), (-1, -1), 9), ("GRID", (0, 0), (-1, -1), 0.3, colors.grey)]
    if header:
        style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")), ("FONTNAME", (0, 0), (-1, 0),
                                                                                  "Helvetica-Bold")]
    table.setStyle(TableStyle(style))
    return table


def write(slide: Slide, path: Path, search: Sequence[Path]) -> None:
    atomic_write_bytes(path, render(slide, search))
