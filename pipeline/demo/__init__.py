"""The embedded default: a local STAC catalog (real + synthetic scenes) served on loopback."""
