"""Looking at a data set through backbones: rank, audit (above the engine, below the CLI)."""
