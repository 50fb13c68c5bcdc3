"""The lab: benchmarks, experiments, planner validation, the llama.cpp baseline, synthetic
models, local clusters and the namespace LAN. Off the serving path: the serving code
(`coordinator up`, the API, the pipeline, the nodes) never imports this package; only the
commands that run lab work do, when they run."""
