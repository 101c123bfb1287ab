"""mimbench harness: config, registries, CLI, run planning, results store and reports."""
