"""The bench display (`cytoedge display`): a web page that subscribes to the publisher and shows the
running differential, the review queue and publisher health (docs/display.md)."""
