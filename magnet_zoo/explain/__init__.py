"""Explanations a pathologist can open: the paper's Fig. 5-style picture and QuPath GeoJSON."""

from magnet_zoo.explain.geojson import roi_geojson, write_geojson
from magnet_zoo.explain.render import render_explanation, save_explanation

__all__ = ["render_explanation", "roi_geojson", "save_explanation", "write_geojson"]
