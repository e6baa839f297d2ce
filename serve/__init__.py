"""HTTP scoring of new samples against a finished run's corpus: `serve.scoring` (plain) and `serve.app` (Ray Serve)."""
