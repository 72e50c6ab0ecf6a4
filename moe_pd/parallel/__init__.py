"""Expert parallelism: rank layout and token dispatch."""
