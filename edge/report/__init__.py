"""The signed slide report: what a slide found (edge.report.slide), as PDF (pdf), JSON and FHIR R4 (fhir)."""
