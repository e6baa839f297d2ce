"""Ray entrypoints: warmup (Ray Train), collect (Ray Data), select, pipeline, finetune, evaluate."""
