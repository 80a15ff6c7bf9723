"""cytoedge: find, classify and publish blood cells at the microscope."""

__version__ = "0.1.0"
