"""Using a trained run outside training: portable export (and, later, an HTTP service)."""
